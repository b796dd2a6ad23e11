"""Model converters, build step (2): float8 and MXFP8 training linears through torchao.

`CONVERTERS` is the registry that `model.converters` is checked against at start-up (it also
holds "lora", whose adapters live in titan.converters.lora);
`apply_converters` runs the configured ones on the meta-device model, before it is
parallelized or split into pipeline stages (so every stage and shard holds converted layers).
"""

import logging

import torch
from torch import nn

from titan.compat import mx_training_unsupported
from titan.config.job_config import Float8, Job, QuantizeLinear

CONVERTERS = ("float8", "mx", "lora")
ROWWISE_RECIPES = ("rowwise", "rowwise_with_gw_hp")  # float8 recipes that scale per row


def check_converters(names: list[str], cfg: QuantizeLinear, compile_blocks: bool) -> None:
    """Stop on unknown or conflicting converters and on options their recipe cannot take."""
    from titan.config import ConfigError

    for name in names:
        if name not in CONVERTERS:
            raise ConfigError(
                f"model.converters names {name!r}, which is not a converter: valid ones are "
                f"{', '.join(CONVERTERS)}"
            )
    if len(set(names)) != len(names) or {"float8", "mx"} <= set(names):
        raise ConfigError(
            f"model.converters = {names}: name each converter once, and use float8 or mx, not both"
        )
    if "lora" in names and {"float8", "mx"} & set(names):
        # torchao's float8/MX linears are not LoRALinear: the adapters would replace them
        raise ConfigError(
            f"model.converters = {names}: lora cannot be combined with float8 or mx (adapters "
            "on low-precision linears are not supported); train LoRA in bf16/fp32"
        )
    if "mx" in names and (why := mx_training_unsupported()):
        raise ConfigError(
            f"model.converters = {names}: torchao's MXFP8 training {why}: upgrade, or use the "
            "float8 converter"
        )
    f8 = cfg.float8
    if "float8" in names and f8.debug_log_freq and compile_blocks:
        raise ConfigError(
            "quantize.linear.float8.debug_log_freq records from eager blocks: set "
            "compile.components = ['loss'] or compile.enable = false, or turn the stats off"
        )
    if "float8" in names and f8.enable_fsdp_float8_all_gather and f8.recipe_name in ROWWISE_RECIPES:
        raise ConfigError(
            f"quantize.linear.float8.enable_fsdp_float8_all_gather needs per-tensor scales; recipe "
            f"{f8.recipe_name!r} scales per row: use recipe_name = 'tensorwise' or turn it off"
        )


def apply_converters(
    model: nn.Module, names: list[str], cfg: QuantizeLinear, device: torch.device, fsdp: bool
) -> int:
    """Swap the configured linears of the (meta-device) model for low-precision training ones;
    returns the training FLOPs per token that run on float8 tensor cores (0 when emulated)."""
    if names:
        # torchao's import warns about each CUDA kernel library a CPU build of torch cannot load
        logging.getLogger("torchao").setLevel(logging.ERROR)
    if "float8" in names:
        from titan.converters.float8 import apply_float8

        return apply_float8(model, cfg.float8, device, fsdp)
    if "mx" in names:
        from titan.converters.mx import apply_mx

        return apply_mx(model, cfg.mx, device)
    return 0


def linear_names(model: nn.Module) -> list[str]:
    """The names of the model's nn.Linear modules (the layers a converter may swap)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def build_float8_stats(parts: list[nn.Module], cfg: Float8 | None, job: Job, rank: int):
    """float8 cast statistics of the parts' float8 layers every cfg.debug_log_freq steps
    (float8_stats.Float8Stats), or None when float8 or its statistics are off."""
    if cfg is None or not cfg.debug_log_freq:
        return None
    from titan.converters.float8_stats import Float8Stats

    return Float8Stats(parts, cfg.debug_log_freq, job.dump_folder, rank)
