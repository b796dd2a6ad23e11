"""MXFP8 training linears through torchao: float8 values with one power-of-two scale per 32
elements. Real kernels need CUDA SM 10.0 (Blackwell); elsewhere the matmuls are emulated."""

import torch
from torch import nn

from titan.config.job_config import MX
from titan.logger import logger

BLOCK = 32  # elements per MX scale


def has_mx_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)


def mx_training_config(cfg: MX, emulate: bool):
    """torchao's MXFP8 training config for the recipe (emulated: the same scales and casts,
    computed with plain PyTorch ops)."""
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe(cfg.recipe_name))
    if emulate:
        config.kernel_preference = KernelPreference.EMULATED
    return config


def apply_mx(model: nn.Module, cfg: MX, device: torch.device) -> int:
    """Make the model's linears (those not filtered) run their matmuls in MXFP8; returns the
    training FLOPs per token their matmuls run on MX tensor cores (0 when emulated)."""
    from torchao.quantization import quantize_

    emulate = cfg.emulate or not has_mx_tensor_cores(device)
    if emulate and not cfg.emulate:
        logger.info(
            f"mx: {device} has no MX tensor cores (CUDA SM 10.0+): MXFP8 matmuls are emulated "
            "(MX numerics, no MX speed)"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def convert(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or any(f in fqn for f in cfg.filter_fqns):
            return False
        return all(size % BLOCK == 0 for size in module.weight.shape)

    converted = [n for n in names if convert(model.get_submodule(n), n)]
    if not converted:
        raise ValueError(
            f"mx converted none of the model's {len(names)} linears (filter_fqns = "
            f"{cfg.filter_fqns}; sizes must be multiples of {BLOCK}): shorten filter_fqns, or "
            "drop the converter"
        )
    quantize_(model, mx_training_config(cfg, emulate), filter_fn=convert)
    logger.info(
        f"mx {cfg.recipe_name}{' (emulated)' if emulate else ''}: {len(converted)} of "
        f"{len(names)} linears"
    )
    if emulate:
        return 0
    per_weight = 4 if cfg.recipe_name.endswith("wgrad_with_hp") else 6  # see float8.py
    return per_weight * sum(model.get_submodule(n).weight.numel() for n in converted)


def is_mx_linear(module: nn.Module) -> bool:
    """Whether a linear's weight was swapped for torchao's MXFP8 training tensor."""
    from torchao.prototype.moe_training.tensor import MXFP8TrainingWeightWrapperTensor

    weight = getattr(module, "weight", None)
    local = getattr(weight, "_local_tensor", weight)  # a DTensor's shard
    return isinstance(getattr(local, "data", local), MXFP8TrainingWeightWrapperTensor)
