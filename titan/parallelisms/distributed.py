"""Process-group start-up (real, or the fake backend for dry runs) and mesh-aware reductions.

COMM_MODE (environment): unset runs real collectives (NCCL on CUDA, gloo on CPU) across the
processes torchrun started; "fake_backend" runs one process that acts as rank 0 of WORLD_SIZE
with collectives that move no data, to build and step a sharded model without the other ranks.
"""

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from titan.errors import ConfigError

COMM_MODES = ("", "fake_backend")


def comm_mode() -> str:
    mode = os.environ.get("COMM_MODE", "")
    if mode == "local_tensor":
        raise ConfigError(
            "COMM_MODE=local_tensor is not implemented in titan: torch's LocalTensorMode gets "
            "tensor-parallel numerics right but runs FSDP2 wrongly (every rank takes shard 0, "
            "torch 2.13). Use COMM_MODE=fake_backend for a dry run, or NGPU=N processes on CPU "
            "(gloo) for numerics"
        )
    if mode not in COMM_MODES:
        raise ConfigError(
            f"COMM_MODE={mode!r} is not supported: leave it unset for real collectives or use "
            "fake_backend for a one-process dry run"
        )
    return mode


def init_distributed(device: torch.device, world_size: int, timeout_s: int = 600) -> None:
    """Start the default process group for this process (a no-op for one process)."""
    if dist.is_initialized() or (world_size == 1 and comm_mode() == ""):
        return
    if comm_mode() == "fake_backend":
        # Importing registers the "fake" backend; its collectives return without moving data.
        from torch.testing._internal.distributed.fake_pg import FakeStore

        rank = int(os.environ.get("RANK", 0))  # the rank this process acts as
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        return
    # NCCL for CUDA tensors; gloo for the CPU tensors some state (e.g. RNG, async saves) uses.
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


_FAKE_MODE: FakeTensorMode | None = None


def fake_mode() -> FakeTensorMode | contextlib.nullcontext:
    """The one FakeTensorMode of this process: tensors of two modes cannot meet in an op.
    TITAN_DRY_RUN_REAL=1 (tests) traces real tensors instead: the same step, really computed."""
    global _FAKE_MODE
    if os.environ.get("TITAN_DRY_RUN_REAL") == "1":
        return contextlib.nullcontext()
    if _FAKE_MODE is None:
        # registers fake-tensor kernels for the c10d collectives (imported only by dry runs)
        import torch.distributed._tools.fake_collectives  # noqa: F401

        # real inputs (token batches, seeds) become fake where they meet fake ones
        _FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE_MODE


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a plain tensor is its own)."""
    return t.to_local() if isinstance(t, DTensor) else t


def dist_sum(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum of a tensor over the ranks of a 1-D mesh (itself when there is no mesh)."""
    if mesh is None or mesh.size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=mesh.get_group())
    return value


def _local_and_sharded_dims(grad: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A gradient's local values and the (mesh, dims) over which its pieces must be summed."""
    if not isinstance(grad, DTensor):
        return grad, ()
    # any non-replicated placement is a piece (Shard, and FSDP-over-TP's _StridedShard)
    dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
    return grad.to_local(), (grad.device_mesh, dims) if dims else ()


def _local_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each gradient's local values on this rank (a DTensor's shard), where there is one."""
    return [_local_and_sharded_dims(p.grad)[0] for p in params if p.grad is not None]


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].device.type == "cpu":
        # CPU norm kernels accumulate in the input dtype, ~1e-4 off for a large fp32 gradient;
        # accumulating in float64 keeps the norm independent of how the gradient is sharded.
        return (
            torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
            .square()
            .sum()
        )
    return torch.stack(torch._foreach_norm(tensors)).float().square().sum()


def clip_grad_norm_(
    params: list[torch.nn.Parameter], max_norm: float, extra_mesh: DeviceMesh | None = None
) -> float:
    """Global L2 norm of all gradients on any mesh; scales them down to max_norm (if > 0)."""
    return clip_grad_norm_tensor_(params, max_norm, extra_mesh).item()


def clip_grad_norm_tensor_(
    params: list[torch.nn.Parameter], max_norm: float, extra_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """clip_grad_norm_ without reading the norm on the host (a float64 tensor): clipping needs
    no device-to-host sync, and a dry run's fake tensors have no value to read.

    Each gradient contributes the squares of its local piece; pieces of a sharded gradient are
    summed over the mesh dimensions it is sharded on and never over replicated ones, so a
    replicated tensor-parallel norm weight counts once. `extra_mesh` sums across ranks that hold
    different parameters (pipeline stages).
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor) and any(x.is_partial() for x in p.grad.placements):
            # a pending sum: finish it, so the norm and the update see the true gradient
            placements = [Replicate() if isinstance(x, Partial) else x for x in p.grad.placements]
            p.grad = p.grad.redistribute(placements=placements)
        local, key = _local_and_sharded_dims(p.grad)
        groups.setdefault(key, []).append(local)
    total_sq = torch.zeros((), dtype=torch.float64)
    for key, locals_ in groups.items():
        sq = _sum_of_squares(locals_)
        if key:
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq = total_sq.to(sq.device, sq.dtype) + sq
    if extra_mesh is not None and extra_mesh.size() > 1:
        dist.all_reduce(total_sq, group=extra_mesh.get_group())
    norm = total_sq.sqrt()
    clip_to_norm_(params, max_norm, norm)
    return norm


def clip_to_norm_(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients by max_norm / norm when above 1 (and the norm is finite), given their
    global norm from clip_grad_norm_tensor_(params, 0.0, ...); max_norm 0: no clipping."""
    if max_norm <= 0:
        return
    locals_ = _local_grads(params)
    if not locals_:
        return
    # below 1 when the norm is above max_norm; 1 (no change) otherwise or when not finite
    coef = torch.where(norm.isfinite(), (max_norm / (norm + 1e-6)).clamp(max=1.0), 1.0)
    # scale the local pieces in place: every DTensor shares its storage with them
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in locals_:
        by_device.setdefault(t.device, []).append(t)
    for device, tensors in by_device.items():
        torch._foreach_mul_(tensors, coef.to(device))


def local_grad_sum_of_squares(params: list[torch.nn.Parameter]) -> float:
    """This rank's own gradient pieces' sum of squares (float64): what a replayed step compares
    to name the ranks whose gradients changed."""
    locals_ = _local_grads(params)
    return float(_sum_of_squares(locals_)) if locals_ else 0.0
