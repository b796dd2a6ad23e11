"""float8 debugging statistics: every `debug_log_freq` steps, for each torchao Float8Linear and
each operand it casts (input, weight, grad_output), the amax, the scale, the float8 dtype and the
fractions of values that saturate or underflow, appended to `float8_stats.jsonl` on rank 0.

What is measured is the cast torchao makes for the gemm that uses the operand's own cast config:
input and weight for `output = input @ weight.t()`, grad_output for `grad_input`; the casts for
the grad_weight gemm (with the `*_for_grad_weight` configs) are not measured. Only the first
micro-batch of a step is measured (pipeline schedules and gradient accumulation run several).
An operand that reaches the layer already in float8 (FSDP's float8 all-gather, torchao's float8
TP styles) is reported with the scale it carries and `"precast": true`; a record of only this
rank's part of a tensor has `"local": true`.
This is a debug path: it gathers DTensors whole and makes an fp32 copy of each operand, and under
torch.compile each hook is a graph break (on every step, armed or not, while it is attached).
"""

import functools
import json
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingType
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim
from torchao.float8.float8_training_tensor import Float8TrainingTensor
from torchao.float8.float8_utils import tensor_to_scale

from titan.logger import logger

OPERANDS = ("input", "weight", "grad_output")
# The dim torchao scales along with axiswise (rowwise) granularity in matmul_with_hp_or_float8_args:
# it casts input (bs, seq, in) and grad_output reshaped to (tokens, out) per row (dim -1), and
# weight.t() (in, out) along dim 0, i.e. one scale per output row of the (out, in) weight.
AXISWISE_DIM = {"input": -1, "weight": 0, "grad_output": -1}
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
SUMMARY_TOP = 3  # layer/operand pairs named in the logged summary, per statistic


def clean_name(name: str) -> str:
    """A module name without the prefixes that AC, compile and FSDP1 wrappers insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _cast_config(config: Float8LinearConfig, operand: str) -> CastConfig:
    return getattr(config, f"cast_config_{operand}")


def _float8_local(x: torch.Tensor) -> Float8TrainingTensor | None:
    """The Float8TrainingTensor inside x, when something upstream has already cast x to float8
    (FSDP's float8 all-gather, torchao's float8 TP styles); else None."""
    while isinstance(x, (DTensor, AsyncCollectiveTensor)):
        x = x._local_tensor if isinstance(x, DTensor) else x.wait()
    return x if isinstance(x, Float8TrainingTensor) else None


def saturation_bound(dtype: torch.dtype) -> float:
    """The largest magnitude that float8 rounding still brings to the largest finite value (max
    plus half the value spacing at max). The fp32 product x * scale can exceed max by an ulp for
    the amax itself (the scale is rounded to fp32); only values beyond this bound are changed by
    torchao's clamp rather than by rounding, so only they count as saturated."""
    info = torch.finfo(dtype)
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


def _record(
    dtype: torch.dtype, amax: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor, numel: int
) -> dict:
    """A record body from device tensors: amax, scale (all of one shape), and the saturated and
    underflow counts (NaN for an underflow count that cannot be known), read with one sync."""
    amax_v, smin, smax, saturated, underflow = torch.cat(
        [torch.stack([amax.float(), scale.min(), scale.max()]).double(), counts.double()]
    ).tolist()
    record = {"dtype": str(dtype).removeprefix("torch."), "amax": amax_v}
    if scale.numel() == 1:
        record["scale"] = smin
    else:  # one scale per row: their range
        record.update(scale_min=smin, scale_max=smax)
    record |= {"saturated": saturated / max(numel, 1), "underflow": underflow / max(numel, 1)}
    if math.isnan(underflow):
        record["underflow"] = None
    return record | {"numel": numel}


@torch.no_grad()
def cast_stats(
    x: torch.Tensor, cast: CastConfig, axiswise_dim: int, round_scales_to_power_of_2: bool
) -> dict:
    """amax, scale and saturated/underflow fractions of torchao's dynamic float8 cast of x."""
    dtype = cast.target_dtype
    scale = tensor_to_scale(
        x,
        dtype,
        scaling_granularity=cast.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(axiswise_dim, cast.scaling_granularity),
        round_scales_to_power_of_2=round_scales_to_power_of_2,
    )
    # torchao's cast: upcast to fp32, multiply by the scale, clamp to +-max, round to float8
    scaled = x.to(torch.float32) * scale
    saturated = ~(scaled.abs() <= saturation_bound(dtype))  # NaN (e.g. inf * 0) counts too
    underflow = (x != 0) & (scaled.to(dtype) == 0)
    counts = torch.stack([saturated.sum(), underflow.sum()])
    return _record(dtype, x.abs().max(), scale, counts, x.numel())


@torch.no_grad()
def precast_stats(x: Float8TrainingTensor) -> dict:
    """Stats of an operand that reached the layer already in float8: its scale is the one used,
    its amax is read back from the float8 values, and only non-finite values can be counted as
    saturated; underflow cannot be told from true zeros, so it is None."""
    values = x._data.to(torch.float32) / x._scale
    nan = torch.tensor(float("nan"), device=values.device)
    counts = torch.stack([(~torch.isfinite(values)).sum().to(nan.dtype), nan])
    record = _record(x._data.dtype, values.abs().max(), x._scale, counts, values.numel())
    return record | {"precast": True}


def operand_stats(x: torch.Tensor, operand: str, config: Float8LinearConfig) -> dict | None:
    """The record body for one operand as the layer casts it; None when its cast is disabled."""
    x = x.detach()
    local = False
    f8 = _float8_local(x)
    if f8 is not None:  # torchao uses the float8 tensor as it is: report what it holds
        local = isinstance(x, DTensor) and not all(p.is_replicate() for p in x.placements)
        record = precast_stats(f8)
    else:
        cast = _cast_config(config, operand)
        if cast.scaling_type is ScalingType.DISABLED:
            return None
        if isinstance(x, DTensor):
            # DTensor math in torchao scales the global tensor: measure the global tensor
            x = x.full_tensor()
        if operand == "grad_output":  # torchao scales it reshaped to (tokens, out_features)
            x = x.reshape(-1, x.shape[-1])
        record = cast_stats(x, cast, AXISWISE_DIM[operand], config.round_scales_to_power_of_2)
    return (record | {"local": True}) if local else record


class Float8Stats:
    """Forward hooks on every Float8Linear of the model parts that, on armed steps (step %
    log_freq == 0), record each cast operand's statistics; `end_step` gathers them to rank 0."""

    def __init__(
        self,
        model_parts: list[nn.Module],
        log_freq: int,
        dump_folder: str,
        rank: int,
        group: dist.ProcessGroup | None = None,
    ):
        if log_freq < 1:
            raise ValueError(f"float8 stats log_freq must be a positive step count, got {log_freq}")
        self.log_freq, self.rank, self.group = log_freq, rank, group
        self.path = os.path.join(dump_folder, "float8_stats.jsonl")
        self._step: int | None = None  # the armed step; None: the hooks return at once
        self._seen: set[str] = set()  # layers measured this step: first micro-batch only
        self._records: list[dict] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for part in model_parts:
            for name, module in part.named_modules():
                if isinstance(module, Float8Linear):
                    hook = functools.partial(self._forward_hook, clean_name(name))
                    # prepend: run before tensor parallel's output hook, so the output is still
                    # the DTensor whose gradient torchao casts (not its local shard)
                    self._handles.append(module.register_forward_hook(hook, prepend=True))

    def start_step(self, step: int) -> None:
        """Arm the hooks for this step if it is one to record."""
        self._step = step if step % self.log_freq == 0 else None
        self._seen.clear()
        self._records = []

    def _add(self, step: int, name: str, operand: str, body: dict | None) -> None:
        if body is not None:
            head = {"step": step, "rank": self.rank, "layer": name, "operand": operand}
            self._records.append(head | body)

    # a graph break under torch.compile: the stats are Python side effects, and tracing them
    # would specialize the compiled block on the step number
    @torch.compiler.disable
    def _forward_hook(
        self, name: str, module: Float8Linear, args: tuple, output: torch.Tensor
    ) -> None:
        step = self._step
        # also skips activation checkpointing's recompute of the layer in backward
        if step is None or name in self._seen:
            return
        self._seen.add(name)
        config = module.config
        x = args[0]
        if torch.is_autocast_enabled("cuda"):  # as Float8Linear.forward does before its matmul
            x = x.to(torch.get_autocast_dtype("cuda"))
        self._add(step, name, "input", operand_stats(x, "input", config))
        # torchao casts weight.t(); AXISWISE_DIM["weight"] is that tensor's dim
        self._add(step, name, "weight", operand_stats(module.weight.t(), "weight", config))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # a plain output of a tensor-parallel layer: its gradient is this rank's part only
            local = not isinstance(output, DTensor) and isinstance(module.weight, DTensor)
            output.register_hook(self._grad_hook(step, name, config, local))

    def _grad_hook(
        self, step: int, name: str, config: Float8LinearConfig, local: bool
    ) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._step != step:  # a backward after end_step (or of an earlier step)
                return
            body = operand_stats(grad, "grad_output", config)
            if body is not None and local:
                body["local"] = True
            self._add(step, name, "grad_output", body)

        return hook

    def end_step(self, step: int) -> list[dict] | None:
        """On armed steps, gather every rank's records to rank 0, which appends them to
        float8_stats.jsonl, logs a summary and returns them. A collective on armed steps."""
        if step % self.log_freq != 0:
            return None
        records, self._records, self._step = self._records, [], None
        self._seen.clear()
        gathered = self._gather(records)
        if gathered is None:
            return None
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            # non-finite amax or scale are written as NaN / Infinity (Python's json reads them)
            f.writelines(json.dumps(r) + "\n" for r in gathered)
        logger.info(summarize(step, gathered, self.path))
        return gathered

    def _gather(self, records: list[dict]) -> list[dict] | None:
        """Every rank's records on the group's rank 0 (this rank's alone without a group)."""
        if not dist.is_initialized():
            return records if self.rank == 0 else None
        group_rank = dist.get_rank(self.group)
        out = [None] * dist.get_world_size(self.group) if group_rank == 0 else None
        dist.gather_object(records, out, group=self.group, group_dst=0)
        return [r for rank_records in out for r in rank_records] if out is not None else None

    def close(self) -> None:
        """Remove the hooks (gradient hooks already on a step's outputs see it disarmed)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._step = None


def summarize(step: int, records: list[dict], path: str) -> str:
    """One log line: the layer/operand pairs with the largest underflow and saturated fractions."""

    def worst(key: str) -> str:
        hits = sorted((r for r in records if r.get(key)), key=lambda r: r[key], reverse=True)
        named = [
            f"{r['layer']} {r['operand']} {100 * r[key]:.3g}% (rank {r['rank']})"
            for r in hits[:SUMMARY_TOP]
        ]
        return ", ".join(named) or "none"

    return (
        f"float8 stats step {step}: {len(records)} casts -> {path}; most underflow: "
        f"{worst('underflow')}; most saturated: {worst('saturated')}"
    )
