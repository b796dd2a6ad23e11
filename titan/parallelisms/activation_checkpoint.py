"""Activation checkpointing of transformer blocks: full, selective (per layer or op), budget."""

import torch
import torch._functorch.config as functorch_config  # not imported by `import torch` alone
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan.config.job_config import ActivationCheckpoint

# Op-level selective AC keeps the outputs of attention and of every second matmul; everything
# else is recomputed. Matmuls are the expensive ops to recompute, attention the most per byte.
_ATTENTION = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
# The matmuls, counted together whatever their precision. A policy runs as a dispatch mode,
# before any tensor subclass: torchao's float8 (and MX) linears reach it as aten.mm on their
# float8 tensors, and compute it inside with torch._scaled_mm (float8 GPUs) or a dequantized mm
# (emulation), which it does not see. torch._scaled_mm called on plain float8 tensors reaches it
# as itself, and counts as a matmul too.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten._scaled_mm.default}


def _op_policy():
    """Save attention and every second matmul: half the matmul memory for half the recompute."""
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in _ATTENTION:
            return CheckpointPolicy.MUST_SAVE
        if func not in _MATMULS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        # torch < 2.13 asks again while recomputing (2.13+ replay the forward's decisions)
        mode = "recompute" if ctx.is_recompute else "forward"
        counts[mode] += 1
        if counts[mode] % 2 == 0:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return create_selective_checkpoint_contexts(policy)


def _wrap(block: nn.Module, op_level: bool) -> nn.Module:
    context_fn = _op_policy if op_level else None
    kwargs = {"context_fn": context_fn} if context_fn else {}
    # Llama 3 has no dropout, so recompute needs no RNG replay, unless a converter added one
    # (LoRA's dropout: a float probability on its layers): recompute must draw the same masks
    random = any(isinstance(getattr(m, "dropout", None), float) and m.dropout > 0
                 for m in block.modules())  # fmt: skip
    return checkpoint_wrapper(block, preserve_rng_state=random, **kwargs)


def apply_ac(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    """Wrap `model.layers` blocks in place according to cfg.mode."""
    if cfg.mode == "none":
        return
    if cfg.mode == "memory_budget":
        # The min-cut partitioner of torch.compile picks what to save within the budget.
        functorch_config.activation_memory_budget = cfg.memory_budget
        return
    every = 1
    op_level = cfg.mode == "selective" and cfg.selective_ac_option == "op"
    if cfg.mode == "selective" and not op_level:
        if not cfg.selective_ac_option.isdigit() or int(cfg.selective_ac_option) < 1:
            raise ValueError(
                f"activation_checkpoint.selective_ac_option = {cfg.selective_ac_option!r}: "
                "use 'op' or a positive integer N (checkpoint every N-th block)"
            )
        every = int(cfg.selective_ac_option)
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if i % every == 0:
            model.layers.register_module(name, _wrap(block, op_level))
