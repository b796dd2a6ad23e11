"""Per-block torch.compile: each transformer block compiles once and the graph is reused."""

from torch import nn

from titan.config.job_config import Compile


def apply_compile(model: nn.Module, cfg: Compile) -> None:
    """Compile each block of `model.layers` in place (parameter names do not change)."""
    if not cfg.blocks:
        return
    for block in model.layers.values():
        # fullgraph: a graph break inside a block is a bug to fix, not a silent slowdown
        block.compile(backend=cfg.backend, fullgraph=True)
