"""The training loss: summed token cross-entropy; callers divides by the global target count."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from titan.config.job_config import Compile
from titan.data.tokens import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy in fp32; logits (bs, seqlen, vocab), labels (bs, seqlen)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(0, 1),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


def build_loss_fn(cfg: Compile) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss, compiled when compile.components includes "loss"."""
    if cfg.enable and "loss" in cfg.components:
        return torch.compile(cross_entropy_sum, backend=cfg.backend)
    return cross_entropy_sum
