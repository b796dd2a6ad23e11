"""Activation offload: what autograd saves inside a transformer block waits for backward in host
memory (torch.autograd.graph.saved_tensors_hooks), and comes back to the device when backward
needs it. FSDP's offload of parameters, gradients and optimizer state is data_parallel's."""

import contextlib
import threading

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from titan.config.job_config import ActivationCheckpoint

_COPYING = threading.local()


def in_host_copy() -> bool:
    """Whether the current op makes an offloaded activation's host copy (the dry run's memory
    tracer counts it as host memory, not the device's)."""
    return getattr(_COPYING, "on", False)


@contextlib.contextmanager
def _host_copy():
    _COPYING.on = True
    try:
        yield
    finally:
        _COPYING.on = False


def check_activation_offload(enabled: bool, ac: ActivationCheckpoint, compile_blocks: bool) -> None:
    """Stop at start-up where `activation_checkpoint.offload` cannot apply."""
    if not enabled:
        return
    if ac.mode == "full" or (ac.mode == "selective" and ac.selective_ac_option == "op"):
        # torch's non-reentrant checkpoint saves through its own saved-tensor hooks (op-level AC
        # in its own cache) and keeps the block's inputs in its recompute closure: nothing of a
        # checkpointed block would reach these hooks
        raise ValueError(
            f"activation_checkpoint.offload with mode = {ac.mode!r}"
            + (" (op-level)" if ac.mode == "selective" else "")
            + " has nothing to offload: checkpointed blocks keep what they save outside torch's "
            "saved-tensor hooks; use mode = 'none', or selective_ac_option = N (the blocks it "
            "does not checkpoint are offloaded), or set offload false"
        )
    if ac.mode == "memory_budget":
        raise ValueError(
            "activation_checkpoint.offload with mode = 'memory_budget': compile's partitioner "
            "decides what is saved inside compiled graphs; use one or the other"
        )
    if compile_blocks:
        # dynamo cannot trace entering saved_tensors_hooks inside a fullgraph block
        raise ValueError(
            "activation_checkpoint.offload with compiled blocks: torch.compile cannot trace the "
            "saved-tensor hooks inside a block; compile only the loss (compile.components = "
            "['loss']), or set offload false"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the local shard itself, not an autograd view of it
        return t.to_local() if isinstance(t, DTensor) else t


def _storage_keys(t: torch.Tensor) -> list[int]:
    t = _local(t)
    if is_traceable_wrapper_subclass(t):  # torchao's float8 weights
        inner = [v for v in vars(t).values() if isinstance(v, torch.Tensor)]
        return [k for v in inner for k in _storage_keys(v)]
    return [t.untyped_storage()._cdata]


class _BlockOffload:
    """saved_tensors_hooks for one block's forward. torch's own save_on_cpu copies every saved
    tensor, FSDP's gathered weights (and their transposes) too, copies a tensor saved by several
    ops once per op, and on CPU returns the tensor itself; these hooks skip anything sharing
    storage with the block's parameters (and float8 tensors: they stay on the device), copy each
    saved tensor once per forward (a DTensor as its local shard), and on CPU make real copies
    both ways, so the CPU parity tests run the same path as a GPU."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.params: set[int] | None = None  # storages of the block's (gathered) parameters
        self.packed: dict[tuple, torch.Tensor] = {}  # this forward's host copies
        self.saved: list[torch.Tensor] = []  # their device originals, until the forward ends

    def pack(self, t: torch.Tensor):
        local = _local(t)
        if isinstance(t, nn.Parameter) or is_traceable_wrapper_subclass(local):
            return t  # FSDP's gathered weights are parameters
        if self.params is None:  # FSDP registers the gathered weights before the block's forward
            self.params = {k for p in self.block.parameters() for k in _storage_keys(p)}
        if local.untyped_storage()._cdata in self.params:  # views of them (a weight's transpose)
            return t
        st = local.untyped_storage()
        key = (st._cdata, local.storage_offset(), local.shape, local.stride(), local.dtype)
        host = self.packed.get(key)
        if host is None:
            cuda = local.device.type == "cuda"
            with _host_copy():  # empty_like keeps the strides of a dense tensor
                host = torch.empty_like(local, device="cpu", pin_memory=cuda)
                host.copy_(local, non_blocking=cuda)
            self.packed[key] = host
            self.saved.append(local)  # its storage key must not be reused within this forward
        spec = (t.device_mesh, t.placements, t.shape, t.stride()) if t is not local else None
        return (local.device, host, spec)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, spec = packed
        if device.type == "cpu":
            local = host.clone()  # a real copy, as a GPU run makes one back to the device
        else:
            local = host.to(device, non_blocking=True)
        if spec is None:
            return local
        mesh, placements, shape, stride = spec
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def enter(self, _module, _args):
        self.params, self.packed, self.saved = None, {}, []
        self.context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.context.__enter__()

    def exit(self, _module, _args, _output):
        self.context.__exit__(None, None, None)
        self.params, self.packed, self.saved = None, {}, []


def apply_activation_offload(model: nn.Module, enabled: bool) -> list:
    """Offload what each block of `model.layers` saves for backward to host memory, except the
    last block's (its backward starts at once) and checkpointed blocks' (AC keeps their inputs
    itself). Forward hooks, not a wrapper: parameter names (and checkpoints) do not change.
    Returns the blocks' offloaders."""
    if not enabled:
        return []
    offloaders = []
    blocks = list(model.layers.values())
    for block in blocks[:-1]:
        if hasattr(block, "_checkpoint_wrapped_module"):
            continue
        offload = _BlockOffload(block)
        block.register_forward_pre_hook(offload.enter)
        block.register_forward_hook(offload.exit, always_call=True)
        offloaders.append(offload)
    return offloaders
