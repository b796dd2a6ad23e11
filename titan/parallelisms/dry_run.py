"""What one rank holds in a dry run (COMM_MODE=fake_backend): parameter, gradient and optimizer
state sizes of its shards (fp32, as a real run keeps them)."""

import resource

import torch
from torch import nn

from titan.parallelisms.distributed import local_tensor

_FP32_BYTES = 4


def local_sizes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Elements this rank holds: call after the optimizer step, before zero_grad."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": sum(local_tensor(p).numel() for p in params),
        "gradients": sum(local_tensor(p.grad).numel() for p in params if p.grad is not None),
        "optimizer state": sum(
            local_tensor(v).numel() for v in state if v.ndim > 0
        ),  # not step counts
    }


def zero_gradients(model: nn.Module) -> torch.Tensor:
    """Stand-in for a pipelined forward/backward in a dry run that cannot afford one: every
    parameter gets a zero gradient, so the optimizer step allocates its real state.

    torch's pipeline schedules keep a stage's FSDP blocks and their gradients unsharded from the
    first micro-batch to the end of the step (about 26 GB for rank 0 of Llama 3 405B at pp 8 x
    tp 8 x fsdp 8), more than a dry run's host has; the sizes reported do not depend on it.
    """
    for p in model.parameters():
        if p.requires_grad:  # frozen ones (LoRA's base) have no gradient
            p.grad = torch.zeros_like(p)
    return torch.zeros(())


def report(sizes: dict[str, int], world_size: int, layout: str, global_params: int) -> str:
    """A few lines: each part's elements and fp32 GiB on this rank, and the process's peak RSS."""
    lines = [f"dry run: rank 0 of {world_size} ({layout}); {global_params:,} parameters in all"]
    total = 0
    for name, n in sizes.items():
        gib = n * _FP32_BYTES / 2**30
        total += gib
        lines.append(f"  {name:>16}: {n:>15,} elements  {gib:8.2f} GiB (fp32)")
    lines.append(f"  {'sum':>16}: {'':>15}           {total:8.2f} GiB before activations")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    lines.append(f"  this process's peak RSS: {peak_rss:.2f} GiB")
    return "\n".join(lines)
