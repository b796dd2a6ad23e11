"""Optimizer and learning-rate schedule builders: AdamW/Adam (Muon in muon.py) and
warmup -> stable -> decay."""

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titan.config.job_config import LRScheduler, Optimizer
from titan.trainer.muon import build_muon


def build_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    """AdamW (or Adam) with weight decay on matrices only; norms' gains are not decayed. Muon:
    Muon on the blocks' matrices, this AdamW on the other parameters (muon.py)."""
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
    if cfg.name == "Muon":
        return build_muon(model, cfg, kwargs)
    if cfg.state_dtype == "bfloat16":
        decoupled = cfg.name == "AdamW"
        return AdamBf16Moments(groups, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, decoupled)
    cls = torch.optim.AdamW if cfg.name == "AdamW" else torch.optim.Adam
    return cls(groups, **kwargs)


class AdamBf16Moments(torch.optim.Optimizer):
    """Adam/AdamW (`decoupled` weight decay) with its two moments stored in bf16: half the
    optimizer state's memory. Each step reads the moments into fp32, applies torch's Adam
    update to the fp32 weights and rounds the new moments back to bf16; with `state_dtype`
    float32 it computes what torch.optim.AdamW (single-tensor) computes. torch's own AdamW keeps
    its state in the parameters' dtype, and torchao's low-bit optimizers quantize to 8/4 bits
    or round the weights themselves, so neither does this. State keys are torch's (step,
    exp_avg, exp_avg_sq): checkpoints and DCP's state-dict helpers treat it as torch's Adam.
    Elementwise per parameter, so any sharding of the parameters gives the same update."""

    def __init__(self, params, lr, betas, eps, decoupled, state_dtype=torch.bfloat16):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        super().__init__(params, defaults)
        self.decoupled, self.state_dtype = decoupled, state_dtype
        # Optimizer.load_state_dict casts every state tensor to its parameter's dtype (fp32):
        # back to the moments' own dtype, losslessly, after each load (a resume)
        self.register_load_state_dict_post_hook(AdamBf16Moments._moments_to_state_dtype)

    def _moments_to_state_dtype(self) -> None:
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad
                if wd and self.decoupled:
                    p.mul_(1 - lr * wd)
                elif wd:
                    grad = grad.add(p, alpha=wd)
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2)
                exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss


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
