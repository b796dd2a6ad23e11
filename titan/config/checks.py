"""Checks of values that concern a component (converters, LoRA, chat data, parallel degrees),
written against the config sections alone so that validating a config imports no component.
The components import their constants from here; `validate` calls every check once at
start-up, and resolve_parallel_dims calls check_degrees again for layouts built outside a
config (the planner's), so each is written once."""

import signal
from dataclasses import dataclass

from titan.compat import muon_unsupported, mx_training_unsupported, nvfp4_training_unsupported
from titan.config.job_config import (
    MX,
    NVFP4,
    Checkpoint,
    Data,
    FaultTolerance,
    Float8,
    JobConfig,
    Lora,
    Optimizer,
    Parallelism,
    QuantizeLinear,
    Resilience,
    Validation,
)
from titan.errors import ConfigError

# The registry of model.converters: each name and the section that configures it.
CONVERTERS = {
    "float8": "quantize.linear.float8",
    "mx": "quantize.linear.mx",
    "nvfp4": "quantize.linear.nvfp4",
    "lora": "lora",
}
LOW_PRECISION = ("float8", "mx", "nvfp4")  # converters of which a model takes at most one
ROWWISE_RECIPES = ("rowwise", "rowwise_with_gw_hp")  # float8 recipes that scale per row
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # Llama 3's linears


@dataclass(frozen=True)
class Converters:
    """The converters model.converters turns on, each as its section (None: off). Code asks
    `converters.float8 is not None` instead of reading the list of names again."""

    float8: Float8 | None = None
    mx: MX | None = None
    nvfp4: NVFP4 | None = None
    lora: Lora | None = None
    first_last_blocks_hp: int = 0  # quantize.linear's: blocks at each end kept unconverted

    def __bool__(self) -> bool:
        return any(c is not None for c in (self.float8, self.mx, self.nvfp4, self.lora))


def converters_of(cfg: JobConfig) -> Converters:
    """The converters of a checked config."""
    names, linear = cfg.model.converters, cfg.quantize.linear
    return Converters(
        float8=linear.float8 if "float8" in names else None,
        mx=linear.mx if "mx" in names else None,
        nvfp4=linear.nvfp4 if "nvfp4" in names else None,
        lora=cfg.lora if "lora" in names else None,
        first_last_blocks_hp=linear.first_last_blocks_hp,
    )


def check_converters(
    names: list[str], cfg: QuantizeLinear, compile_blocks: bool, tp_degree: int = 1
) -> None:
    """Stop on unknown or conflicting converters and on options their recipe cannot take."""
    for name in names:
        if name not in CONVERTERS:
            raise ConfigError(
                f"model.converters names {name!r}, which is not a converter: valid ones are "
                f"{', '.join(CONVERTERS)}"
            )
    low = set(LOW_PRECISION) & set(names)
    if len(set(names)) != len(names) or len(low) > 1:
        raise ConfigError(
            f"model.converters = {names}: name each converter once, and use float8 or mx or "
            "nvfp4, not several"
        )
    if "lora" in names and low:
        # torchao's float8/MX/NVFP4 linears are not LoRALinear: the adapters would replace them
        raise ConfigError(
            f"model.converters = {names}: lora cannot be combined with float8, mx or nvfp4 "
            "(adapters on low-precision linears are not supported); train LoRA in bf16/fp32"
        )
    if cfg.first_last_blocks_hp < 0:
        raise ConfigError(
            f"quantize.linear.first_last_blocks_hp = {cfg.first_last_blocks_hp} must be >= 0"
        )
    if "nvfp4" in names and (why := nvfp4_training_unsupported()):
        raise ConfigError(
            f"model.converters = {names}: torchao's NVFP4 training {why}: upgrade torchao, or use "
            "the float8 converter"
        )
    if "nvfp4" in names:
        check_nvfp4(cfg.nvfp4, tp_degree)
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


def check_nvfp4(cfg: NVFP4, tp_degree: int) -> None:
    """Stop on [quantize.linear.nvfp4] settings no NVFP4 path can run."""
    if tp_degree > 1:
        # torchao's NVFP4 TP styles exist only inside its Triton (SM 10.0+) kernels: neither
        # titan's emulation nor a CPU can run or check them
        raise ConfigError(
            "model.converters = ['nvfp4'] with tensor parallel is not supported (torchao's NVFP4 "
            "TP runs only in its Blackwell kernels, unchecked here): set "
            "parallelism.tensor_parallel_degree = 1, or use the float8 converter with TP"
        )
    for key in ("hadamard", "stochastic_rounding"):
        if not getattr(cfg, key) and not cfg.emulate:
            raise ConfigError(
                f"quantize.linear.nvfp4.{key} = false needs quantize.linear.nvfp4.emulate = true "
                "(torchao's NVFP4 kernels always apply it)"
            )


def check_lora(cfg: Lora) -> None:
    """Stop on [lora] values that no adapter can take."""
    if cfg.rank < 1:
        raise ConfigError(f"lora.rank = {cfg.rank} must be >= 1")
    if not cfg.alpha > 0:
        raise ConfigError(f"lora.alpha = {cfg.alpha} must be > 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"lora.dropout = {cfg.dropout} must be in [0, 1)")
    unknown = [t for t in cfg.target_modules if t not in LORA_TARGETS]
    if unknown or not cfg.target_modules:
        raise ConfigError(
            f"lora.target_modules = {cfg.target_modules}: "
            + (f"{unknown} are not linears of Llama 3" if unknown else "name at least one")
            + f"; valid ones are {', '.join(LORA_TARGETS)}"
        )


def check_optimizer(cfg: Optimizer, converters: list[str], cpu_offload: bool) -> None:
    """Stop on Muon settings it cannot take (the [optimizer] keys of AdamW are checked with
    the others in validate)."""
    if cfg.name != "Muon":
        return
    if why := muon_unsupported():
        raise ConfigError(f"optimizer.name = 'Muon' {why}: upgrade torch, or use AdamW")
    if cfg.state_dtype != "float32":
        raise ConfigError(
            f"optimizer.state_dtype = {cfg.state_dtype!r} applies to AdamW/Adam's moments; with "
            "optimizer.name = 'Muon' keep float32 (torch's Muon keeps state in the weights' dtype)"
        )
    if "lora" in converters:
        raise ConfigError(
            "optimizer.name = 'Muon' with LoRA: orthogonalizing the low-rank adapters' updates "
            "is not supported; train LoRA with AdamW"
        )
    if cpu_offload:
        raise ConfigError(
            "optimizer.name = 'Muon' gathers each block matrix across its ranks in the step; with "
            "parallelism.fsdp_cpu_offload the step runs on host tensors, which NCCL cannot "
            "gather: turn the offload off, or use AdamW"
        )
    if not cfg.muon_lr > 0:
        raise ConfigError(f"optimizer.muon_lr = {cfg.muon_lr} must be > 0")
    if not 0.0 <= cfg.muon_momentum < 1.0:
        raise ConfigError(f"optimizer.muon_momentum = {cfg.muon_momentum} must be in [0, 1)")
    if cfg.muon_weight_decay < 0:
        raise ConfigError(f"optimizer.muon_weight_decay = {cfg.muon_weight_decay} must be >= 0")
    if not 1 <= cfg.muon_ns_steps < 100:
        raise ConfigError(f"optimizer.muon_ns_steps = {cfg.muon_ns_steps} must be in [1, 99]")


def check_chat_config(cfg: Data, attn_mask_type: str) -> None:
    """Reject data settings chat examples cannot be read with (called by config validation)."""
    if cfg.format != "chat":
        if not cfg.packing:
            raise ConfigError("data.packing = false applies to data.format = 'chat'; text "
                              "documents are always packed")  # fmt: skip
        return
    if cfg.blend:
        raise ConfigError("data.blend mixes text sources; data.format = 'chat' reads one source "
                          "(data.path or data.dataset): drop data.blend")  # fmt: skip
    if cfg.path is None and cfg.dataset in ("default", "synthetic"):
        raise ConfigError(f"data.format = 'chat' needs examples with a {cfg.messages_field!r} "
                          f"column, which data.dataset = {cfg.dataset!r} has not: give "
                          "--data.path FILE or a hub --data.dataset")  # fmt: skip
    if cfg.path is None and cfg.streaming:
        raise ConfigError(f"data.format = 'chat' reads examples by index, which a streamed hub "
                          f"dataset ({cfg.dataset!r}) cannot be: set --data.streaming false "
                          "(downloads it) or give --data.path local files")  # fmt: skip
    if cfg.packing and attn_mask_type != "block_causal":
        # with causal masking each packed example would attend to the examples before it
        raise ConfigError("data.packing = true packs several chat examples into a window: set "
                          "--model.attn_mask_type block_causal so that they do not attend to "
                          "each other, or --data.packing false")  # fmt: skip


def check_degrees(p: Parallelism) -> None:
    """Each degree a positive number of ranks (data_parallel_shard_degree: or -1, the rest of
    the world); run at validation and again by every layout resolved from a section."""
    for key in (
        "data_parallel_replicate_degree",
        "tensor_parallel_degree",
        "pipeline_parallel_degree",
        "context_parallel_degree",
        "pipeline_parallel_microbatch_size",
    ):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallelism.{key} = {getattr(p, key)} must be >= 1")
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree}: "
            "use >= 1 or -1"
        )


ANOMALY_POLICIES = ("stop", "skip", "rollback")


def check_hf_save(ckpt: Checkpoint, converters: list[str]) -> None:
    if ckpt.hf_save == "none":
        return
    if not ckpt.enable:
        raise ConfigError(
            f"checkpoint.hf_save = {ckpt.hf_save!r} writes beside the run's checkpoints: add "
            "--checkpoint.enable"
        )
    if "lora" in converters:
        raise ConfigError(
            "checkpoint.hf_save does not write LoRA runs: export with titan-convert-to-hf "
            "--merge-lora or --peft from the step-N checkpoint"
        )


def check_resilience(r: Resilience, ckpt: Checkpoint) -> None:
    for name in r.preemption_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in (
            "SIGKILL",
            "SIGSTOP",
        ):
            raise ConfigError(
                f"resilience.preemption_signals: {name!r} is not a signal a process can catch "
                "(use names such as SIGTERM, SIGUSR1)"
            )
    if r.on_anomaly not in ANOMALY_POLICIES:
        raise ConfigError(
            f"resilience.on_anomaly = {r.on_anomaly!r} is not one of {', '.join(ANOMALY_POLICIES)}"
        )
    if r.on_anomaly == "rollback" and not ckpt.enable:
        raise ConfigError(
            "resilience.on_anomaly = 'rollback' rolls back to the newest checkpoint: add "
            "--checkpoint.enable (or choose 'stop' or 'skip')"
        )
    for key in ("spike_sigma", "grad_norm_spike_factor", "watchdog_timeout_s"):
        if getattr(r, key) < 0:
            raise ConfigError(f"resilience.{key} = {getattr(r, key)} must be >= 0 (0: off)")
    if 0 < r.grad_norm_spike_factor <= 1:
        raise ConfigError(
            f"resilience.grad_norm_spike_factor = {r.grad_norm_spike_factor} must be > 1 (a "
            "jump above the recent mean), or 0 for off"
        )
    if r.spike_window < 2:
        raise ConfigError(f"resilience.spike_window = {r.spike_window} must be >= 2")
    if r.rollback_skip_batches < 1:
        raise ConfigError(
            f"resilience.rollback_skip_batches = {r.rollback_skip_batches} must be >= 1"
        )
    if r.straggler_report_freq < 0:
        raise ConfigError(
            f"resilience.straggler_report_freq = {r.straggler_report_freq} must be >= 0 (0: off)"
        )


def check_validation(v: Validation, d: Data) -> None:
    """Validation's settings, and that holdout validation has documents held out to read."""
    if not v.enable:
        return
    if v.freq <= 0:
        raise ConfigError(f"validation.freq = {v.freq} must be > 0")
    if v.steps != -1 and v.steps < 1:
        raise ConfigError(f"validation.steps = {v.steps}: use a positive count or -1 (one pass)")
    if v.dataset != "holdout" or v.path is not None:
        return
    if d.blend or d.dataset == "synthetic" or d.holdout_every == 0:
        why = (
            "data.blend mixes several sources" if d.blend
            else "data.dataset = 'synthetic' has no documents" if d.dataset == "synthetic"
            else "data.holdout_every = 0 holds nothing out"
        )  # fmt: skip
        raise ConfigError(
            f"validation.dataset = 'holdout' reads the documents data.holdout_every holds out of "
            f"training, but {why}: set --data.holdout_every N (e.g. 100), or name the "
            "validation data with --validation.path or --validation.dataset"
        )


FT_BACKENDS = ("gloo", "nccl")


def check_fault_tolerance(ft: FaultTolerance, p: Parallelism, r: Resilience) -> None:
    """torchft's replica groups: their ids and count, and the layouts and policies this
    integration does not take (yet)."""
    if not ft.enable:
        return
    if ft.replica_groups < 1 or not 0 <= ft.replica_group < ft.replica_groups:
        raise ConfigError(
            f"fault_tolerance.replica_group = {ft.replica_group} must be in [0, replica_groups = "
            f"{ft.replica_groups})"
        )
    if not 1 <= ft.min_replicas <= ft.replica_groups:
        raise ConfigError(
            f"fault_tolerance.min_replicas = {ft.min_replicas} must be in [1, replica_groups = "
            f"{ft.replica_groups}]"
        )
    if ft.process_group not in FT_BACKENDS:
        raise ConfigError(
            f"fault_tolerance.process_group = {ft.process_group!r} is not one of "
            f"{', '.join(FT_BACKENDS)}"
        )
    for key in ("timeout_s", "quorum_timeout_s"):
        if getattr(ft, key) < 1:
            raise ConfigError(f"fault_tolerance.{key} = {getattr(ft, key)} must be >= 1")
    if p.data_parallel_replicate_degree != 1:
        raise ConfigError(
            "fault_tolerance.enable: the replica dimension is fault_tolerance.replica_groups "
            "(one job per group); set parallelism.data_parallel_replicate_degree = 1 "
            f"(not {p.data_parallel_replicate_degree}) and shard inside each group"
        )
    if r.on_anomaly == "rollback":
        raise ConfigError(
            "resilience.on_anomaly = 'rollback' with fault_tolerance.enable: a group rolling "
            "back alone would leave the quorum's step; use 'stop' or 'skip'"
        )
