"""Model converters, build step (2): apply_converters applies what `model.converters` names.
float8 and MXFP8 training linears (torchao) and LoRA/DoRA adapters replace the model's linears
on the meta device, before it is parallelized or split into pipeline stages, so every stage and
shard holds converted layers. The names and the sections that configure them (CONVERTERS), and
which may be named together, live in titan.config.checks: start-up checks them against the
config alone, and the rest of titan asks `converters_of(cfg)` instead of reading the names."""

import logging

import torch
from torch import nn

from titan.config.checks import Converters
from titan.config.job_config import Float8, Job


def apply_converters(
    model: nn.Module, converters: Converters, device: torch.device, fsdp: bool
) -> int:
    """Swap the model's (meta-device) linears for the configured converters' ones; returns the
    training FLOPs per token that run on float8 tensor cores (0 when emulated or none)."""
    if converters.float8 is not None or converters.mx is not None:
        # torchao's import warns about each CUDA kernel library a CPU build of torch cannot load
        logging.getLogger("torchao").setLevel(logging.ERROR)
    flops = 0
    if converters.float8 is not None:
        from titan.converters.float8 import apply_float8

        flops = apply_float8(model, converters.float8, device, fsdp)
    if converters.mx is not None:
        from titan.converters.mx import apply_mx

        flops = apply_mx(model, converters.mx, device)
    if converters.lora is not None:
        from titan.converters.lora import apply_lora

        apply_lora(model, converters.lora)
    return flops


def build_float8_stats(parts: list[nn.Module], cfg: Float8, job: Job, rank: int):
    """float8 cast statistics of the parts' float8 layers every cfg.debug_log_freq steps
    (float8_stats.Float8Stats), or None when the statistics are off (the caller builds them
    only with the float8 converter on)."""
    if not cfg.debug_log_freq:
        return None
    from titan.converters.float8_stats import Float8Stats

    return Float8Stats(parts, cfg.debug_log_freq, job.dump_folder, rank)
