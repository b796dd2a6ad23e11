"""Data parallel transforms: FSDP2 / HSDP (`fully_shard`) and DDP (composable `replicate`)."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)


def check_cpu_offload(enabled: bool, fsdp_enabled: bool) -> None:
    """Stop before start-up where `parallelism.fsdp_cpu_offload` cannot apply."""
    if enabled and not fsdp_enabled:
        raise ValueError(
            "parallelism.fsdp_cpu_offload offloads FSDP's shards, but this layout applies no FSDP "
            "(data_parallel_shard_degree is 1): shard over more than one rank, or set it false"
        )


def offload_policy(cpu_offload: bool, device_type: str) -> OffloadPolicy:
    """FSDP's policy: the shards, their gradients and the optimizer step on the host.

    Pinned host memory lets the copies to and from a GPU run asynchronously; on a CPU run (the
    parity tests, dry runs) there is nothing to pin and FSDP's copies are no-ops, but its
    offload code path (host shards, host gradients, the optimizer stepping there) still runs.
    """
    if not cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device_type == "cuda")


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
    cpu_offload: bool,
) -> None:
    """Shard each transformer block, then the root (embeddings, final norm, output).

    `mesh` is 1-D for FSDP, or 2-D (replicate, shard) for HSDP. Blocks gather their parameters
    one at a time; the root holds what is left, including tied embedding/output weights, which
    stay one parameter. Gradients are averaged over the mesh (the trainer scales the loss so
    the average is the sum it needs).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = offload_policy(cpu_offload, mesh.device_type)
    if reshard_after_forward not in ("default", "always", "never"):
        raise ValueError(
            f"parallelism.fsdp_reshard_after_forward = {reshard_after_forward!r}: "
            "use default, always or never"
        )
    # Freeing gathered parameters after forward saves memory for one more all-gather in
    # backward; "default" does it for the blocks (the root is needed again right away).
    reshard = reshard_after_forward != "never"
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's backward starts as soon as its forward ends: keep it gathered
        last = i == len(blocks) - 1 and reshard_after_forward == "default"
        fully_shard(
            block, mesh=mesh, reshard_after_forward=reshard and not last, mp_policy=mp,
            offload_policy=offload,
        )  # fmt: skip
    fully_shard(
        model, mesh=mesh, reshard_after_forward=reshard_after_forward == "always", mp_policy=mp,
        offload_policy=offload,
    )  # fmt: skip


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Replicate the model over `mesh`; gradients are all-reduced (averaged) in backward."""
    from torch.distributed._composable.replicate import replicate

    # 100 MB buckets rather than DDP's 25 MB: fewer, larger all-reduces for billion-parameter models
    replicate(model, device_mesh=mesh, bucket_cap_mb=100)
