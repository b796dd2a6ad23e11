"""Dry runs by tracing (COMM_MODE=fake_backend): one process acts as a rank of the config's world
and runs its real step (shapes, batch, AC, float8, pipeline schedule, context parallel) on fake
tensors with the fake process group, so nothing is allocated and no matmul runs; a dispatch
mode records every storage the step creates and frees, giving the rank's peak memory by part."""

import contextlib
import dataclasses
import json
import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed._tools.fake_collectives  # noqa: F401 (collectives on fake tensors)
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,  # noqa: F401 (for train.py)
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from titan.config import ConfigError
from titan.config.job_config import JobConfig
from titan.logger import logger
from titan.parallelisms.distributed import clip_grad_norm_tensor_

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
# SDPA's dense boolean document masks exist only off-GPU: on CUDA, flex attention's block
# mask (a few KiB) replaces them. Tracked apart and left out of the peak.
DENSE_MASKS = "dense attention masks"

_FAKE_MODE: FakeTensorMode | None = None


def fake_mode() -> FakeTensorMode | contextlib.nullcontext:
    """The one FakeTensorMode of this process: tensors of two modes cannot meet in an op.
    TITAN_DRY_RUN_REAL=1 (tests) traces real tensors instead: the same step, really computed."""
    global _FAKE_MODE
    if os.environ.get("TITAN_DRY_RUN_REAL") == "1":
        return contextlib.nullcontext()
    if _FAKE_MODE is None:
        # real inputs (token batches, seeds) become fake where they meet fake ones
        _FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE_MODE


@dataclass
class MemoryEstimate:
    rank: int
    label: str  # e.g. "pp stage 0" or "rank 0"
    peak: dict[str, int]  # bytes of each part at the peak (PARTS)
    dense_masks: int = 0  # bytes of dense masks live at the peak (not in the peak)
    # bytes this rank stores once the gradients are complete (before the optimizer step):
    # parameters, gradients and optimizer state, exact
    held: dict[str, int] = field(default_factory=dict)
    trace_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.peak.values())


class MemoryTracer(TorchDispatchMode):
    """Tracks every storage created under it (by dispatch, or by `UntypedStorage.resize_`, which
    FSDP uses to gather and free unsharded weights) with the part it belongs to, and keeps
    the composition at the highest total."""

    def __init__(self, model: nn.Module, static: dict[str, list[torch.Tensor]]):
        super().__init__()
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
        self.peak_taken = 0  # the total when the peak's composition was taken
        self.snapshots = 0
        self.propagating = 0  # inside DTensor's shape propagation
        self._fake_on_entry = None
        for part, tensors in static.items():
            for t in tensors:
                for st in _tensor_storages(t):
                    self._add(st, part)
        self.peak_total = self.total
        self.peak = self._composition()

    # -- storages --
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
        self.total += nbytes
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
            parts[part] += n
        seen = set()

        def move(t: torch.Tensor, to: str) -> None:
            for st in _tensor_storages(t):  # no dispatch: reads the subclasses' attributes
                key = st._cdata
                entry = self.live.get(key)
                if entry is not None and key not in seen and entry[0][1] != "parameters":
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
    def __enter__(self):
        self._fake_on_entry = active_fake_mode()
        torch.UntypedStorage.resize_ = lambda st, size: self._resize(st, size)
        tracer = self

        def propagate(prop, op_schema):  # global-shape placeholders: not this rank's memory
            tracer.propagating += 1
            try:
                return _ORIGINAL_PROPAGATE(prop, op_schema)
            finally:
                tracer.propagating -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE
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
            part = "communication buffers"
            for st in _storages((args, kwargs, out)):
                self._add(st, part)
                self._retag(st, part)
            return out
        if self.optimizer_phase:
            part = "optimizer temporaries"
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
_ORIGINAL_PROPAGATE = ShardingPropagator._propagate_tensor_meta_non_cached


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


def _bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages under tensors."""
    storages = {st._cdata: st.nbytes() for t in tensors for st in _tensor_storages(t)}
    return sum(storages.values())


def _storages(tree) -> list[torch.UntypedStorage]:
    return [st for t in _tensors(tree) for st in _tensor_storages(t)]


@contextlib.contextmanager
def tracing(model: nn.Module, static: dict[str, list[torch.Tensor]]):
    """Trace under the fake mode: yields the tracer (its `peak` is final on exit)."""
    tracer = MemoryTracer(model, static)
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


def zero_gradients(model: nn.Module) -> None:
    """Every trainable parameter gets a zero gradient (so an optimizer step makes its state)."""
    for p in model.parameters():
        if p.requires_grad:  # frozen ones (LoRA's base) have no gradient
            p.grad = torch.zeros_like(p)


def write_json(path: str, estimates: list[MemoryEstimate], memory_gib: float, fits: bool) -> None:
    """The estimates in bytes, for scripts and tests (dump_folder/dry_run.json)."""
    ranks = [dataclasses.asdict(e) | {"total": e.total} for e in estimates]
    body = {"memory_gib": memory_gib, "fits": fits, "ranks": ranks}
    with open(path, "w") as f:
        json.dump(body, f, indent=1)


def report(estimates: list[MemoryEstimate], memory_gib: float, header: str) -> tuple[str, bool]:
    """The report's lines, and whether every traced rank fits in memory_gib."""
    lines = [header]
    fits = True
    for e in estimates:
        lines.append(f"  {e.label} (rank {e.rank}; traced in {e.trace_s:.1f} s): peak "
                     f"{e.total / GIB:.2f} GiB")  # fmt: skip
        for part in PARTS:
            if e.peak[part]:
                lines.append(f"    {part:>22}: {e.peak[part] / GIB:9.3f} GiB")
        if e.dense_masks >= 2**20:
            lines.append(f"    (left out: {e.dense_masks / GIB:.3f} GiB of {DENSE_MASKS}, "
                         "CPU only: flex attention's block mask replaces them on GPU)")  # fmt: skip
        lines.extend(f"    note: {n}" for n in e.notes)
    worst = max(estimates, key=lambda e: e.total)
    over = worst.total / GIB - memory_gib
    if over > 0:
        fits = False
        lines.append(
            f"  DOES NOT FIT: {worst.label} peaks at {worst.total / GIB:.2f} GiB, {over:.2f} GiB "
            f"over the {memory_gib:g} GiB device (dry_run.memory_gib): shard more (FSDP, TP, "
            "PP, CP), checkpoint activations, or lower training.local_batch_size"
        )
    else:
        lines.append(f"  fits: the highest peak ({worst.label}) is {worst.total / GIB:.2f} GiB of "
                     f"{memory_gib:g} GiB, {-over:.2f} GiB free")  # fmt: skip
    return "\n".join(lines), fits


def traceable(cfg: JobConfig) -> JobConfig:
    """The config a trace runs: the GPU run's optimizer (fused AdamW, unless the config says),
    and eager (inductor's kernels are built from real compiles)."""
    if cfg.optimizer.implementation == "auto":
        cfg = dataclasses.replace(
            cfg, optimizer=dataclasses.replace(cfg.optimizer, implementation="fused")
        )
    if cfg.compile.enable:
        logger.info("dry run: traced eagerly (compile off); compiled blocks fuse elementwise ops "
                    "and usually hold less activation memory than this estimate")  # fmt: skip
        cfg = dataclasses.replace(cfg, compile=dataclasses.replace(cfg.compile, enable=False))
    return cfg


def traced_ranks(cfg: JobConfig, world_size: int) -> list[tuple[int, str]]:
    """(rank, label) of each rank to trace: cfg.dry_run.ranks, else rank 0 and, pipelined, the
    last pipeline rank too (the pipeline is the outermost mesh dimension). The first holds the
    embedding and the most micro-batches in flight, the last the output layer and the loss; a
    rank between holds fewer micro-batches than the first, and neither end layer."""
    if cfg.dry_run.ranks:
        bad = [r for r in cfg.dry_run.ranks if not 0 <= r < world_size]
        if bad:
            raise ConfigError(f"dry_run.ranks = {bad}: ranks are 0..{world_size - 1}")
        return [(r, f"rank {r}") for r in cfg.dry_run.ranks]
    pp = cfg.parallelism.pipeline_parallel_degree
    if pp == 1:
        return [(0, "rank 0")]
    return [(0, "pp rank 0"), ((pp - 1) * (world_size // pp), f"pp rank {pp - 1}")]


def _notes(trainer) -> list[str]:
    """What the eager trace holds that the configured (compiled) run would not."""
    compiled = trainer.compile_as_written
    if not (compiled.enable and "loss" in compiled.components):
        return []
    cfg, dims = trainer.cfg, trainer.parallel_dims
    batch = cfg.training.local_batch_size
    if dims.pp > 1:
        batch = cfg.parallelism.pipeline_parallel_microbatch_size
    vocab = trainer.model_args.vocab_size // (dims.tp if trainer.loss_parallel else 1)
    log_probs = batch * cfg.training.seq_len // dims.cp * vocab * 4
    return [f"the eager loss holds fp32 log-probabilities, {log_probs / GIB:.2f} GiB a micro-batch "
            "at the peak; the compiled loss (compile.components) does not"]  # fmt: skip


def trace_step(trainer, rank: int, label: str) -> MemoryEstimate:
    """Trace one training step of `trainer` (a titan.train.Trainer built in a dry run) after a
    first step made the optimizer state, as every step after the first runs."""
    start = time.perf_counter()
    microbatches = trainer._next_microbatches(iter(trainer.dataloader))
    model, optimizer = trainer.model, trainer.optimizer
    with fake_mode():
        zero_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = list(model.parameters())
    with tracing(model, static_state(model, optimizer)) as tracer:
        trainer.forward_backward(microbatches)
        held = {name: _bytes(ts) for name, ts in static_state(model, optimizer).items()}
        held["gradients"] = _bytes([p.grad for p in params if p.grad is not None])
        tracer.optimizer_phase = True
        clip_grad_norm_tensor_(params, trainer.cfg.training.max_norm, trainer.pp_mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = {k: v for k, v in tracer.peak.items() if k != DENSE_MASKS}
    notes = _notes(trainer)
    if trainer.cfg.activation_checkpoint.mode == "memory_budget":
        notes.append("activation_checkpoint.mode = 'memory_budget' acts through compile: traced "
                     "without checkpointing (an upper bound)")  # fmt: skip
    return MemoryEstimate(
        rank, label, peak, dense_masks=tracer.peak[DENSE_MASKS], held=held,
        trace_s=time.perf_counter() - start, notes=notes,
    )  # fmt: skip
