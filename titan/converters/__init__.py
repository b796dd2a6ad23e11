"""Model converters, build step (2): apply_converters applies what `model.converters` names.
float8, MXFP8 and NVFP4 training linears (torchao; NVFP4 emulated by titan off Blackwell) and
LoRA/DoRA adapters replace the model's linears on the meta device, before it is parallelized or
split into pipeline stages, so every stage and shard holds converted layers. The names and the
sections that configure them (CONVERTERS), and which may be named together, live in
titan.config.checks: start-up checks them against the config alone, and the rest of titan asks
`converters_of(cfg)` instead of reading the names."""

import dataclasses
import logging

import torch
from torch import nn

from titan.config.checks import Converters
from titan.config.job_config import Float8, Job


def apply_converters(
    model: nn.Module, converters: Converters, device: torch.device, fsdp: bool
) -> int:
    """Swap the model's (meta-device) linears for the configured converters' ones; returns the
    training FLOPs per token that run on low-precision (float8, MX or NVFP4) tensor cores (0
    when emulated or none)."""
    keep = []
    if converters.float8 is not None or converters.mx is not None or converters.nvfp4 is not None:
        keep = kept_in_high_precision(model, converters.first_last_blocks_hp)
        # torchao's import warns about each CUDA kernel library a CPU build of torch cannot load
        logging.getLogger("torchao").setLevel(logging.ERROR)
    flops = 0
    if (f8 := converters.float8) is not None:
        from titan.converters.float8 import apply_float8

        f8 = dataclasses.replace(f8, filter_fqns=[*f8.filter_fqns, *keep])
        flops = apply_float8(model, f8, device, fsdp)
    if (mx := converters.mx) is not None:
        from titan.converters.mx import apply_mx

        flops = apply_mx(
            model, dataclasses.replace(mx, filter_fqns=[*mx.filter_fqns, *keep]), device
        )
    if (fp4 := converters.nvfp4) is not None:
        from titan.converters.nvfp4 import apply_nvfp4

        fp4 = dataclasses.replace(fp4, filter_fqns=[*fp4.filter_fqns, *keep])
        flops = apply_nvfp4(model, fp4, device)
    if converters.lora is not None:
        from titan.converters.lora import apply_lora

        apply_lora(model, converters.lora)
    return flops


def kept_in_high_precision(model: nn.Module, n: int) -> list[str]:
    """quantize.linear.first_last_blocks_hp = n: name prefixes (filter_fqns entries) of the first
    n and last n transformer blocks and the output layer, which low-precision converters leave
    alone (the model is whole here: pipeline stages are cut later)."""
    if n == 0:
        return []
    blocks = list(model.layers.keys())
    if 2 * n >= len(blocks):
        raise ValueError(
            f"quantize.linear.first_last_blocks_hp = {n} keeps all {len(blocks)} blocks in high "
            f"precision: use at most {(len(blocks) - 1) // 2}, or drop the low-precision converter"
        )
    return [f"layers.{b}." for b in blocks[:n] + blocks[-n:]] + ["output"]


def build_float8_stats(parts: list[nn.Module], cfg: Float8, job: Job, rank: int):
    """float8 cast statistics of the parts' float8 layers every cfg.debug_log_freq steps
    (float8_stats.Float8Stats), or None when the statistics are off (the caller builds them
    only with the float8 converter on)."""
    if not cfg.debug_log_freq:
        return None
    from titan.converters.float8_stats import Float8Stats

    return Float8Stats(parts, cfg.debug_log_freq, job.dump_folder, rank)
