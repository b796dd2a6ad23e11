"""The converters' config sections ([quantize.linear.float8], [quantize.linear.mx],
[quantize.linear.nvfp4], [lora]), kept apart from job_config.py, which imports them into the one
schema (JobConfig)."""

from dataclasses import dataclass, field


@dataclass
class Float8:
    recipe_name: str = "tensorwise"
    """tensorwise (dynamic per-tensor scales; e4m3 weights and activations, e5m2 gradients),
    hybrid (the same formats, named as in Megatron-LM), rowwise (per-row power-of-2 scales,
    e4m3 throughout) or rowwise_with_gw_hp (rowwise, weight gradients in high precision)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linears whose name contains any of these stay in high precision."""
    auto_filter_small_kn: bool = True
    """Also keep linears too small to gain from float8 in high precision (torchao's H100
    thresholds for the recipe; rowwise's for rowwise_with_gw_hp)."""
    enable_fsdp_float8_all_gather: bool = False
    """FSDP all-gathers weights in float8 (tensorwise/hybrid only); their scales are computed
    for all layers at once after each optimizer step."""
    emulate: bool = False
    """Emulate float8 matmuls in high precision even on GPUs with float8 tensor cores (CPU
    and GPUs before SM 8.9 always emulate, with a log line)."""
    debug_log_freq: int = 0
    """Every N steps, record each float8 layer's amax, scale and the fractions of values that
    saturate or underflow in its casts (float8_stats.jsonl in job.dump_folder); 0 is off."""


@dataclass
class MX:
    recipe_name: str = "mxfp8_rceil"
    """mxfp8_rceil (MXFP8 with RCEIL block scales) or mxfp8_rceil_wgrad_with_hp (weight gradients
    in high precision)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linears whose name contains any of these stay in high precision."""
    emulate: bool = False
    """Emulate MXFP8 matmuls even on SM 10.0+ GPUs (elsewhere they are always emulated, with a
    log line)."""


@dataclass
class NVFP4:
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linears whose name contains any of these stay in high precision."""
    emulate: bool = False
    """Emulate NVFP4 matmuls even on SM 10.0+ GPUs (elsewhere they are always emulated, with a
    log line)."""
    hadamard: bool = True
    """Random Hadamard transform (16x16, random signs) on the weight gradient's operands before
    they are quantized; torchao's kernels always apply it, so false needs emulate = true."""
    stochastic_rounding: bool = True
    """Round gradients to FP4 stochastically (unbiased) instead of to nearest; torchao's kernels
    always do, so false needs emulate = true."""
    hadamard_seed: int = 0
    """Seed of the Hadamard transform's 16 random signs, shared by every layer and rank."""


@dataclass
class QuantizeLinear:
    float8: Float8 = field(default_factory=Float8)
    """[quantize.linear.float8]: the float8 converter's settings."""
    mx: MX = field(default_factory=MX)
    """[quantize.linear.mx]: the mx converter's settings."""
    nvfp4: NVFP4 = field(default_factory=NVFP4)
    """[quantize.linear.nvfp4]: the nvfp4 converter's settings."""
    first_last_blocks_hp: int = 0
    """Keep the first N and the last N transformer blocks, and output, in high precision under
    the float8, mx or nvfp4 converter (no effect without one); 0 keeps only filter_fqns'."""


@dataclass
class Quantize:
    linear: QuantizeLinear = field(default_factory=QuantizeLinear)
    """[quantize.linear]: low-precision training linears (model.converters turns them on)."""


@dataclass
class Lora:
    rank: int = 8
    """Rank r of each adapter: A is (r, in_features), B is (out_features, r)."""
    alpha: float = 16.0
    """The update B A x is scaled by alpha / rank (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training (PEFT's lora_dropout), in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Linears that get adapters, by the last part of their name: wq, wk, wv, wo (attention),
    w1, w2, w3 (feed-forward), output."""
    use_dora: bool = False
    """DoRA: also train a per-row magnitude m, y = m * (W + s B A) x / ||W + s B A||_row."""
