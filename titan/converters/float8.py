"""float8 training linears through torchao: recipes, the layer filter, emulation where the
hardware has no float8 tensor cores, FSDP's float8 all-gather, and the float8 TP plan styles."""

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan.config.checks import ROWWISE_RECIPES
from titan.config.job_config import Float8
from titan.logger import logger
from titan.parallelisms.distributed import comm_mode


def has_float8_tensor_cores(device: torch.device) -> bool:
    """float8 matmuls (torch._scaled_mm) need CUDA compute capability 8.9 (Ada, Hopper) or newer.
    A dry run traces the GPU run's float8 matmuls (on fake tensors, which any device can)."""
    if comm_mode() == "fake_backend":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def float8_linear_config(cfg: Float8, emulate: bool, fsdp_all_gather: bool):
    """torchao's Float8LinearConfig for the recipe."""
    from torchao.float8 import CastConfig, Float8LinearConfig

    if cfg.recipe_name == "hybrid":
        # Megatron-LM's "hybrid" FP8 format: e4m3 (more mantissa) for weights and activations,
        # e5m2 (more range) for gradients; with dynamic per-tensor scales this is torchao's
        # tensorwise recipe, spelled out here so that the formats are explicit.
        config = Float8LinearConfig(
            cast_config_input=CastConfig(target_dtype=torch.float8_e4m3fn),
            cast_config_weight=CastConfig(target_dtype=torch.float8_e4m3fn),
            cast_config_grad_output=CastConfig(target_dtype=torch.float8_e5m2),
        )
    else:
        config = Float8LinearConfig.from_recipe_name(cfg.recipe_name)
    return dataclasses.replace(
        config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather
    )


def module_filter(cfg: Float8) -> Callable[[nn.Module, str], bool]:
    """Which linears become float8: not those named in filter_fqns, not those whose sizes are not
    multiples of 16 (float8 matmul kernels need them), and with auto_filter_small_kn not those too
    small to gain (torchao's thresholds, measured on H100s)."""
    from torchao.float8 import _auto_filter_for_recipe

    auto = None
    if cfg.auto_filter_small_kn:
        # torchao has no thresholds for rowwise_with_gw_hp: it runs rowwise kernels
        recipe = {"hybrid": "tensorwise", "rowwise_with_gw_hp": "rowwise"}.get(
            cfg.recipe_name, cfg.recipe_name
        )
        auto = _auto_filter_for_recipe(recipe, filter_fqns=[])

    def convert(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or any(f in fqn for f in cfg.filter_fqns):
            return False
        n, k = module.weight.shape
        if n % 16 or k % 16:
            return False
        return auto is None or auto(module, fqn)

    return convert


def apply_float8(model: nn.Module, cfg: Float8, device: torch.device, fsdp: bool) -> int:
    """Swap the model's linears for torchao Float8Linear layers (on the meta device); returns
    the training FLOPs per token their matmuls run on float8 tensor cores (0 when emulated)."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    emulate = cfg.emulate or not has_float8_tensor_cores(device)
    if emulate and not cfg.emulate:
        logger.info(
            f"float8: {device} has no float8 tensor cores (CUDA SM 8.9+): the matmuls are "
            "emulated in high precision (float8 numerics, no float8 speed)"
        )
    fsdp_all_gather = cfg.enable_fsdp_float8_all_gather and fsdp
    if cfg.enable_fsdp_float8_all_gather and not fsdp:
        logger.info("float8: enable_fsdp_float8_all_gather has no effect without FSDP")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convert_to_float8_training(
        model,
        config=float8_linear_config(cfg, emulate, fsdp_all_gather),
        module_filter_fn=module_filter(cfg),
    )
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    if not converted:
        raise ValueError(
            f"float8 converted none of the model's {len(names)} linears (filter_fqns = "
            f"{cfg.filter_fqns}, auto_filter_small_kn = {cfg.auto_filter_small_kn}: layers too "
            "small to gain): set quantize.linear.float8.auto_filter_small_kn = false, or drop "
            "the converter"
        )
    kept = sorted({_kind(n) for n in names if n not in converted})
    logger.info(
        f"float8 {cfg.recipe_name}{' (emulated)' if emulate else ''}: {len(converted)} of "
        f"{len(names)} linears; in high precision: {', '.join(kept) or 'none'}"
        + ("; FSDP all-gathers weights in float8" if fsdp_all_gather else "")
    )
    if emulate:
        return 0
    # 2 FLOPs per weight forward, 2 for the input gradient, 2 for the weight gradient (which
    # rowwise_with_gw_hp computes in high precision)
    per_weight = 4 if cfg.recipe_name == "rowwise_with_gw_hp" else 6
    return per_weight * sum(model.get_submodule(n).weight.numel() for n in converted)


def _kind(name: str) -> str:
    """'layers.3.attention.wk' -> 'attention.wk': a layer's role, for a short log line."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" else name


def precompute_float8_scales(parts: list[nn.Module], cfg: Float8) -> None:
    """After the optimizer step: every float8-all-gathered weight's scale, in one all-reduce
    (instead of one small all-reduce per layer inside the next forward)."""
    if not cfg.enable_fsdp_float8_all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)


def float8_tp_enabled(cfg: Float8 | None, tp_mesh: DeviceMesh) -> bool:
    """Whether TP casts activations to float8 before its all-gathers (torchao's float8 TP
    styles): tensorwise recipes only, and not on gloo, which cannot send float8 tensors (there
    the plain TP styles shard the float8 layers, with the same numerics)."""
    if cfg is None or cfg.recipe_name in ROWWISE_RECIPES:
        return False
    return dist.get_backend(tp_mesh.get_group()) != "gloo"


def float8_tp_styles(block: nn.Module) -> tuple[Callable, Callable, Callable]:
    """(colwise, rowwise, prepare_input) style makers for a block's TP plan, each called with the
    module name(s) it applies to and the style's keyword arguments: torchao's float8 styles for
    float8 layers (a prepared input only when all its consumers are float8), the plain ones
    otherwise."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
    )
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    def is_float8(*fqns: str) -> bool:
        return all(isinstance(block.get_submodule(f), Float8Linear) for f in fqns)

    def colwise(fqn: str, **kw):
        return Float8ColwiseParallel(**kw) if is_float8(fqn) else ColwiseParallel(**kw)

    def rowwise(fqn: str, **kw):
        return Float8RowwiseParallel(**kw) if is_float8(fqn) else RowwiseParallel(**kw)

    def prepare(fqns: list[str], **kw):
        if is_float8(*fqns):
            # cast once before the all-gather: float8 on the wire, shared by the consumers
            first = fqns[0].split(".")[-1]
            return PrepareFloat8ModuleInput(**kw, fwd_config_submodule_fqn=first)
        return PrepareModuleInput(**kw)

    return colwise, rowwise, prepare
