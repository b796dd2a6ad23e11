"""The memory tracer of dry runs: a dispatch mode that records every storage a traced step
creates and frees (on fake tensors, or real ones) with its bytes and the part of a rank's memory
it belongs to, and keeps the composition at the peak."""

import contextlib
import weakref
from collections import Counter

import torch
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from titan.parallelisms.distributed import fake_mode
from titan.parallelisms.offload import in_host_copy

GIB = 2**30
# The parts of a rank's memory, in report order. Parameters, buffers and optimizer state are
# there before the step; the rest is what the step allocates, by when it was made.
PARTS = (
    "parameters",  # this rank's shards, as stored (fp32)
    "gradients",  # this rank's gradient shards at the peak (and FSDP's unsharded accumulation)
    "optimizer state",  # AdamW's two moments
    "activations",  # made in forward and still held (saved for backward, in-flight micro-batches)
    "backward temporaries",  # made in backward: activation gradients, AC recompute
    "gathered parameters",  # FSDP's unsharded weights (storages it resizes)
    "communication buffers",  # tensors a collective read or wrote (all-gather/reduce-scatter)
    "optimizer temporaries",  # made by the optimizer step (foreach intermediates)
    "buffers",  # module buffers (RoPE table)
)
# What offload keeps in host memory is tracked apart from the device and left out of its peak:
# "host: <part>" for FSDP's CPU offload (parameters, gradients, optimizer state, and the
# optimizer step, which runs on the host there) and activation offload (activations).
HOST = "host: "
# SDPA's dense boolean document masks exist only off-GPU: on CUDA, flex attention's block
# mask (a few KiB) replaces them. Tracked apart and left out of the peak.
DENSE_MASKS = "dense attention masks"


class MemoryTracer(TorchDispatchMode):
    """Tracks every storage created under it (by dispatch, or by `UntypedStorage.resize_`, which
    FSDP uses to gather and free unsharded weights) with the part it belongs to, and keeps
    the composition at the highest total."""

    def __init__(
        self, model: nn.Module, static: dict[str, list[torch.Tensor]], host: frozenset = frozenset()
    ):
        super().__init__()
        self.host = host  # the PARTS kept in host memory (offload)
        self.host_total = 0
        self.host_peak: dict[str, int] = {}  # host bytes by part at the host's own peak
        self._grad_hooks: list = []
        self.model = model
        self.params = list(model.parameters())  # the stored ones: FSDP's shards hold the grads
        self.fsdp_params = _fsdp_params(model)
        self.live: dict[int, tuple[list, weakref.ref]] = {}  # storage key -> ([bytes, part], ref)
        self.current: Counter[str] = Counter()
        self.total = 0
        self.peak_total = 0
        self.peak: dict[str, int] = {}
        self.pending = False  # a new peak since the last snapshot
        self.optimizer_phase = False
        self.optimizer_peak = 0  # the highest total during the optimizer phase
        self.peak_taken = 0  # the total when the peak's composition was taken
        self.snapshots = 0
        self.propagating = 0  # inside DTensor's shape propagation
        self._fake_on_entry = None
        for part, tensors in static.items():
            for t in tensors:
                for st in _tensor_storages(t):
                    self._add(st, self._where(part))
        self.peak_total = self.total
        self.peak = self._composition()

    # -- storages --
    def _where(self, part: str) -> str:
        return HOST + part if part in self.host else part

    def _add(self, st: torch.UntypedStorage, part: str) -> None:
        key = st._cdata
        if key in self.live:
            return
        info = [st.nbytes(), part]
        ref = weakref.ref(st, lambda _ref, key=key: self._free(key))
        self.live[key] = (info, ref)
        self._grow(info, info[0])

    def _grow(self, info: list, nbytes: int) -> None:
        # the composition of a new peak, when it starts to fall; peaks within 0.2% (or 1 MiB)
        # of the last one taken keep its composition (finding the gradients costs a few ms)
        if nbytes < 0 and self.pending:  # the current state is the peak's
            if self.peak_total > self.peak_taken * 1.002 + 2**20:
                self.snapshots += 1
                self._snapshot()
            self.pending = False
        self.current[info[1]] += nbytes
        if info[1].startswith(HOST):
            self.host_total += nbytes
            if self.host_total > sum(self.host_peak.values()):
                self.host_peak = {k: v for k, v in self.current.items() if k.startswith(HOST)}
            return
        self.total += nbytes
        if self.optimizer_phase and self.total > self.optimizer_peak:
            self.optimizer_peak = self.total
        if self.total > self.peak_total:
            self.peak_total = self.total
            self.pending = True

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            info = entry[0]
            self._grow(info, -info[0])

    def _retag(self, st: torch.UntypedStorage, part: str) -> None:
        entry = self.live.get(st._cdata)
        if entry is not None and entry[0][1] != part:
            info = entry[0]
            if info[1].startswith(HOST) and not part.startswith(HOST):
                return  # host shards stay host memory when a collective (its copy-in) reads them
            if info[1].startswith(HOST) != part.startswith(HOST):  # onto the host
                self._grow(info, -info[0])
                info[1] = part
                self._grow(info, info[0])
                return
            self.current[info[1]] -= info[0]
            info[1] = part
            self.current[part] += info[0]

    def _resize(self, st: torch.UntypedStorage, size: int) -> None:
        """Stands in for UntypedStorage.resize_ while tracing."""
        _ORIGINAL_RESIZE(st, size)
        entry = self.live.get(st._cdata)
        if entry is None:
            self._add(st, "gathered parameters")
            return
        self._retag(st, "gathered parameters")
        info = entry[0]
        delta = st.nbytes() - info[0]
        info[0] = st.nbytes()
        self._grow(info, delta)

    # -- the peak --
    def _composition(self) -> dict[str, int]:
        """The current bytes by part, with the parameters' gradients moved to "gradients"."""
        parts = dict.fromkeys(PARTS, 0)
        parts[DENSE_MASKS] = 0
        for part, n in self.current.items():
            if not part.startswith(HOST):
                parts[part] += n
        seen = set()

        def move(t: torch.Tensor, to: str) -> None:
            for st in _tensor_storages(t):  # no dispatch: reads the subclasses' attributes
                key = st._cdata
                entry = self.live.get(key)
                keep = entry is None or entry[0][1] == "parameters" or entry[0][1].startswith(HOST)
                if not keep and key not in seen:
                    seen.add(key)
                    parts[entry[0][1]] -= entry[0][0]
                    parts[to] += entry[0][0]

        for p in self.params:
            if p.grad is not None:
                move(p.grad, "gradients")
        # FSDP without gradient sync (pipeline micro-batches) accumulates unsharded gradients
        for fp in self.fsdp_params:
            for grad in (getattr(fp, "unsharded_accumulated_grad", None),
                         getattr(getattr(fp, "_unsharded_param", None), "grad", None)):  # fmt: skip
                if grad is not None:
                    move(grad, "gradients")
        # FSDP registers the unsharded weights in place of the shards while it uses them
        for p in self.model.parameters():
            move(p, "gathered parameters")
        return parts

    def _snapshot(self) -> None:
        self.peak = self._composition()
        self.peak_taken = self.total
        self.pending = False

    def finish(self) -> dict[str, int]:
        if self.pending and self.peak_total > self.peak_taken:
            self._snapshot()
        return self.peak

    # -- dispatch --
    def _offloaded_grad(self, p: torch.Tensor) -> None:
        """FSDP's CPU offload copies each reduced gradient shard to the host (a no-op when the
        trace runs on CPU): from then on it is host memory."""
        for st in _tensor_storages(p.grad):
            self._retag(st, HOST + "gradients")

    def __enter__(self):
        self._fake_on_entry = active_fake_mode()
        if "gradients" in self.host:  # FSDP runs a parameter's hooks once it set its gradient
            hook = self._offloaded_grad
            self._grad_hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]
        torch.UntypedStorage.resize_ = lambda st, size: self._resize(st, size)
        tracer = self

        def propagate(prop, op_schema):  # global-shape placeholders: not this rank's memory
            tracer.propagating += 1
            try:
                return _ORIGINAL_PROPAGATE(prop, op_schema)
            finally:
                tracer.propagating -= 1

        if _ORIGINAL_PROPAGATE is not None:
            ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return super().__enter__()

    def __exit__(self, *args):
        for handle in self._grad_hooks:
            handle.remove()
        torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE
        if _ORIGINAL_PROPAGATE is not None:
            ShardingPropagator._propagate_tensor_meta_non_cached = _ORIGINAL_PROPAGATE
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not FakeTensor and t is not torch.Tensor for t in types):
            # let DTensor and torchao's float8 tensors run their inner ops, which it then sees
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if self.propagating or active_fake_mode() is not self._fake_on_entry:
            return out  # DTensor's sharding propagation on fake tensors: not memory
        namespace = func.namespace
        if namespace == "fsdp" and func.__name__.startswith("split_with_sizes_copy"):
            # FSDP copies the all-gathered weights into their unsharded parameters
            for st in _storages(kwargs.get("out") if kwargs else args[-1]):
                self._add(st, "gathered parameters")
                self._retag(st, "gathered parameters")
            return out
        if namespace in ("c10d", "_c10d_functional", "fsdp"):
            # in the optimizer step: Muon's gathered matrices
            part = self._where(
                "optimizer temporaries" if self.optimizer_phase else "communication buffers"
            )
            for st in _storages((args, kwargs, out)):
                self._add(st, part)
                self._retag(st, part)
            return out
        if self.optimizer_phase:
            part = self._where("optimizer temporaries")
        elif in_host_copy():
            part = HOST + "activations"  # activation offload's copy to the host
        elif torch._C._current_graph_task_id() != -1:
            part = "backward temporaries"
        else:
            part = "activations"
        for t in _tensors(out):
            for st in _tensor_storages(t):
                self._add(st, DENSE_MASKS if t.dtype == torch.bool else part)
        return out


_ORIGINAL_RESIZE = torch.UntypedStorage.resize_
# DTensor infers its outputs' global shapes by running each op on fake global-shape tensors
# (a torch internal: without it, the placeholders count and the tracer's tests fail)
_ORIGINAL_PROPAGATE = getattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", None)


def _fsdp_params(model: nn.Module) -> list:
    """FSDP2's per-parameter records (torch internals, read only: unsharded gradients)."""
    records = []
    for module in model.modules():
        if not hasattr(module, "_get_fsdp_state"):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.12: one group
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        records += [fp for group in groups for fp in group.fsdp_params]
    return records


def _tensors(tree) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _tensor_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages under a tensor, through subclasses (DTensor, torchao's float8 weights),
    without dispatching an op."""
    if isinstance(t, DTensor):
        return _tensor_storages(t._local_tensor)
    if not is_traceable_wrapper_subclass(t):
        return [t.untyped_storage()]
    # the inner tensors are attributes (torchao's __tensor_flatten__ reads a fake scale's value)
    return [
        st for v in vars(t).values() if isinstance(v, torch.Tensor) for st in _tensor_storages(v)
    ]


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages under tensors."""
    storages = {st._cdata: st.nbytes() for t in tensors for st in _tensor_storages(t)}
    return sum(storages.values())


def _storages(tree) -> list[torch.UntypedStorage]:
    return [st for t in _tensors(tree) for st in _tensor_storages(t)]


@contextlib.contextmanager
def tracing(model: nn.Module, static: dict[str, list[torch.Tensor]], host: frozenset = frozenset()):
    """Trace under the fake mode: yields the tracer (its `peak` is final on exit). `host`: the
    PARTS that offload keeps in host memory."""
    tracer = MemoryTracer(model, static, host)
    with fake_mode(), tracer:
        yield tracer
    tracer.finish()


def static_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list]:
    """What a rank holds between steps: parameter shards, buffers, optimizer state."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": list(model.parameters()),
        "buffers": list(model.buffers()),
        "optimizer state": [v for v in state if v.ndim > 0],  # not the step counts
    }
