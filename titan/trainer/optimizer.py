"""Optimizer and learning-rate schedule builders: AdamW/Adam and warmup -> stable -> decay."""

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titan.config.job_config import LRScheduler, Optimizer


def build_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    """AdamW (or Adam) with weight decay on matrices only; norms' gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = params[0].device.type
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {
        "lr": cfg.lr,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
        "foreach": impl == "foreach",
        "fused": impl == "fused",
    }
    cls = torch.optim.AdamW if cfg.name == "AdamW" else torch.optim.Adam
    return cls(groups, **kwargs)


def lr_factor(step: int, *, total_steps: int, cfg: LRScheduler) -> float:
    """Multiplier of the peak LR at 0-based optimizer step `step`.

    Linear warmup over warmup_steps, then the peak until the decay phase (the last
    decay_ratio of the post-warmup steps, or all of them), which ends at min_lr_factor.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    after_warmup = total_steps - warmup
    decay_steps = after_warmup if cfg.decay_ratio is None else round(cfg.decay_ratio * after_warmup)
    decay_steps = max(decay_steps, 1)  # warmup_steps >= total_steps leaves no decay phase
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)  # reaches 1 at the last step
    if cfg.decay_type == "linear":
        curve = 1.0 - progress
    elif cfg.decay_type == "sqrt":
        curve = 1.0 - math.sqrt(progress)
    else:  # cosine
        curve = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * curve


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int
) -> LambdaLR:
    """A scheduler whose `step()` follows `lr_factor`; call it once per optimizer step."""
    return LambdaLR(optimizer, functools.partial(lr_factor, total_steps=total_steps, cfg=cfg))
