"""Load a JobConfig from TOML plus `--section.key value` overrides, and validate it in one place.

Every error names the offending key and, for a misspelling, the nearest valid name.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from titan.config.checks import (
    check_chat_config,
    check_converters,
    check_degrees,
    check_fault_tolerance,
    check_hf_save,
    check_lora,
    check_optimizer,
    check_resilience,
    check_validation,
)
from titan.config.job_config import JobConfig
from titan.errors import ConfigError
from titan.logger import logger

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"  # package data


def load_config(args: list[str] | None = None, config_file: str | None = None) -> JobConfig:
    """Build the config: defaults <- TOML file <- command-line overrides, then validate.

    The TOML file comes from `config_file`, else `--job.config_file PATH` in `args`.
    """
    overrides = _parse_args(sys.argv[1:] if args is None else args)
    config_file = overrides.pop("job.config_file", None) or config_file
    cfg = JobConfig()
    if config_file is not None:
        path = _config_path(config_file)
        try:
            with path.open("rb") as f:
                table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{config_file} is not valid TOML: {e}") from None
        _apply_table(cfg, table, source=config_file)
        cfg.job.config_file = str(config_file)
    for dotted, raw in overrides.items():
        section, key = _resolve_key(cfg, dotted, source="command line")
        _set(section, key, raw, where=f"--{dotted}", from_string=True)
    validate(cfg)
    return cfg


def _config_path(name: str) -> Path:
    """`name` as given, else a shipped config from any folder: by name (`debug_model.toml`,
    `debug_model`) or by its path beside the titan package (`titan/train_configs/...`)."""
    given = Path(name).expanduser()
    tries = [given]
    if not given.is_absolute():
        tries.append(SHIPPED_CONFIGS.parents[1] / given)
        if given.parent == Path("."):  # a bare name, `.toml` optional
            tries.append(SHIPPED_CONFIGS / f"{given.name.removesuffix('.toml')}.toml")
    for path in tries:
        if path.is_file():
            return path
    looked = ", ".join(str(p.absolute()) for p in tries)
    shipped = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.toml")))
    raise ConfigError(
        f"config file not found: {name} (looked at {looked}); the shipped configs, which any "
        f"folder can name: {shipped}"
    )


def to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (for printing, logging and writing to the run folder)."""
    return dataclasses.asdict(cfg)


def to_toml(cfg: JobConfig) -> str:
    """The effective config as TOML text that `load_config` reads back to an equal config."""
    lines: list[str] = []

    def add(name: str, table: dict[str, Any]) -> None:
        values = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if values:  # a table holding only sub-tables needs no header
            lines.append(f"[{name}]")
            for key, value in values.items():
                if value is not None:  # TOML has no null: an absent key means the default None
                    lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        for key, value in table.items():
            if isinstance(value, dict):
                add(f"{name}.{key}", value)

    for section, table in to_dict(cfg).items():
        add(section, table)
    return "\n".join(lines)


def field_docs(section_cls: type) -> dict[str, str]:
    """Each field's doc: the string literal written under it in job_config.py."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(section_cls)).body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every section and key with its default and doc, for `--help`."""
    out: list[str] = []

    def add(section: Any, prefix: str) -> None:
        docs = field_docs(type(section))
        out.append(f"[{prefix}]")
        tables = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                tables.append((value, f"{prefix}.{f.name}"))
                continue
            out.append(f"  --{prefix}.{f.name} (default {value!r})")
            out.append(f"      {docs.get(f.name, '')}")
        for value, name in tables:
            add(value, name)

    for sec in dataclasses.fields(JobConfig):
        add(getattr(JobConfig(), sec.name), sec.name)
    return "\n".join(out)


def _parse_args(args: list[str]) -> dict[str, str]:
    """`--a.b value`, `--a.b=value`, and bare `--a.b` (a boolean flag) -> {"a.b": "value"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key value"
            )
        name, eq, value = arg[2:].partition("=")
        if not eq:
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if takes_value else "true"
            i += 1 if takes_value else 0
        out[name] = value
        i += 1
    return out


def _nearest(name: str, options: list[str]) -> str:
    lowered = {o.lower(): o for o in options}  # case slips ('adamw') count as close
    match = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.5)
    return f"; did you mean {lowered[match[0]]!r}?" if match else f"; valid: {', '.join(options)}"


def _section(cfg: JobConfig, path: list[str], source: str) -> Any:
    """The (sub-)section object at `path`, e.g. ["quantize", "linear", "float8"]."""
    section: Any = cfg
    for depth, name in enumerate(path):
        tables = [f.name for f in dataclasses.fields(section) if _is_table(section, f.name)]
        if name not in tables:
            where = ".".join(path[:depth])
            what = f"{where}.{name!r}" if where else repr(name)
            raise ConfigError(f"unknown config section {what} ({source})" + _nearest(name, tables))
        section = getattr(section, name)
    return section


def _resolve_key(cfg: JobConfig, dotted: str, source: str) -> tuple[Any, str]:
    """The (sub-)section object holding `dotted`'s last part, and that key."""
    *path, key = dotted.split(".")
    section = _section(cfg, path, source)
    keys = [f.name for f in dataclasses.fields(section) if not _is_table(section, f.name)]
    if not path or key not in keys:
        hint = _nearest(key, keys)
        raise ConfigError(f"unknown config key {'.'.join(path)}.{key!r} ({source})" + hint)
    return section, key


def _is_table(section: Any, name: str) -> bool:
    return dataclasses.is_dataclass(getattr(section, name))


def _apply_table(cfg: JobConfig, table: dict[str, Any], source: str, prefix: str = "") -> None:
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):  # a [table] or [table.sub]: it must name a section
            _section(cfg, dotted.split("."), source)  # raises for an unknown section
            _apply_table(cfg, value, source, prefix=f"{dotted}.")
        elif not prefix:
            raise ConfigError(f"{source}: top-level key {name!r} must be a [table]")
        else:
            section, key = _resolve_key(cfg, dotted, source=source)
            _set(section, key, value, where=f"{dotted} in {source}", from_string=False)


def _set(section: Any, key: str, value: Any, where: str, from_string: bool) -> None:
    hint = typing.get_type_hints(type(section))[key]
    try:
        setattr(section, key, _coerce(value, hint, from_string))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({e})") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, from_string: bool) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or raise."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (from_string and str(value).lower() in ("none", "null")):
            return None
        return _coerce(value, inner, from_string)
    if typing.get_origin(hint) is list:
        if from_string:
            value = [v for v in str(value).split(",") if v != ""]
        if not isinstance(value, list):
            raise TypeError("not a list")
        return [_coerce(v, args[0], from_string) for v in value]
    if hint is bool:
        if from_string and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_string and str(value).lower() in ("false", "0", "no"):
            return False
        if isinstance(value, bool):
            return value
        raise TypeError("not a boolean")
    if hint is int:
        if isinstance(value, bool) or (not from_string and not isinstance(value, int)):
            raise TypeError("not an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or (not from_string and not isinstance(value, int | float)):
            raise TypeError("not a number")
        return float(value)
    if hint is str:
        if not from_string and not isinstance(value, str):
            raise TypeError("not a string")
        return str(value)
    raise TypeError(f"unsupported field type {hint}")


_CHOICES = {
    "model.name": ("llama3",),
    "model.attn_mask_type": ("causal", "block_causal"),
    "data.format": ("text", "chat"),
    "training.mixed_precision_param": ("bfloat16", "float32"),
    "training.device": ("auto", "cpu", "cuda"),
    "optimizer.name": ("AdamW", "Adam", "Muon"),
    "optimizer.muon_adjust_lr": ("original", "match_rms_adamw"),
    "optimizer.muon_ns_dtype": ("bfloat16", "float32"),
    "optimizer.implementation": ("auto", "for-loop", "foreach", "fused"),
    "optimizer.state_dtype": ("float32", "bfloat16"),
    "lr_scheduler.decay_type": ("linear", "cosine", "sqrt"),
    "parallelism.fsdp_reshard_after_forward": ("default", "always", "never"),
    "parallelism.context_parallel_rotate_method": ("allgather", "alltoall"),
    "parallelism.pipeline_parallel_grad_reduce": ("stage", "microbatch"),
    # titan.parallelisms.pipeline.SCHEDULES (a test keeps the two equal)
    "parallelism.pipeline_parallel_schedule": (
        "GPipe",
        "1F1B",
        "Interleaved1F1B",
        "LoopedBFS",
        "InterleavedZeroBubble",
        "ZBVZeroBubble",
        "DualPipeV",
    ),  # fmt: skip
    "activation_checkpoint.mode": ("none", "full", "selective", "memory_budget"),
    "checkpoint.async_mode": ("disabled", "async", "async_with_pinned_mem"),
    "checkpoint.export_dtype": ("float32", "bfloat16"),
    "checkpoint.hf_save": ("none", "last", "every"),
    "quantize.linear.float8.recipe_name": ("tensorwise", "hybrid", "rowwise", "rowwise_with_gw_hp"),
    "quantize.linear.mx.recipe_name": ("mxfp8_rceil", "mxfp8_rceil_wgrad_with_hp"),
}


def validate(cfg: JobConfig) -> None:
    """Reject impossible values at start-up, naming the key."""
    for dotted, choices in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ConfigError(
                f"{dotted} = {value!r} is not one of {', '.join(choices)}"
                + _nearest(value, list(choices))
            )
    t, o, s = cfg.training, cfg.optimizer, cfg.lr_scheduler
    _positive(
        cfg,
        "training.steps",
        "training.local_batch_size",
        "training.seq_len",
        "optimizer.lr",
        "metrics.log_freq",
        "checkpoint.interval",
        "training.gc_freq",
    )
    _non_negative(
        cfg,
        "training.max_norm",
        "training.loss_chunk_tokens",
        "optimizer.weight_decay",
        "optimizer.eps",
        "lr_scheduler.warmup_steps",
        "lr_scheduler.min_lr_factor",
        "checkpoint.keep_latest_k",
        "quantize.linear.float8.debug_log_freq",
    )
    if t.global_batch_size != -1 and t.global_batch_size < 1:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size}: use a positive count or -1"
        )
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optimizer.{key} = {getattr(o, key)} must be in [0, 1)")
    if s.min_lr_factor > 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_factor = {s.min_lr_factor} must be in [0, 1]")
    if s.decay_ratio is not None and not 0.0 <= s.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio = {s.decay_ratio} must be in [0, 1] or unset")
    check_validation(cfg.validation, cfg.data)
    c = cfg.checkpoint
    if c.load_step != -1 and not c.enable:
        raise ConfigError(
            f"checkpoint.load_step = {c.load_step} names a checkpoint to resume from, but "
            "checkpoint.enable is false: add --checkpoint.enable (or drop load_step)"
        )
    if s.warmup_steps >= t.steps:
        logger.warning(
            f"lr_scheduler.warmup_steps = {s.warmup_steps} >= training.steps = {t.steps}: "
            "the learning rate never reaches its peak"
        )
    p = cfg.parallelism
    check_degrees(p)
    if (
        p.pipeline_parallel_layers_per_stage is not None
        and p.pipeline_parallel_layers_per_stage < 1
    ):
        raise ConfigError(
            f"parallelism.pipeline_parallel_layers_per_stage = "
            f"{p.pipeline_parallel_layers_per_stage} must be >= 1 (or unset)"
        )
    _non_negative(
        cfg,
        "parallelism.pipeline_parallel_first_stage_less_layers",
        "parallelism.pipeline_parallel_last_stage_less_layers",
    )
    unknown = set(cfg.checkpoint.exclude_from_loading) - {
        "model",
        "optimizer",
        "lr_scheduler",
        "dataloader",
        "train_state",
    }
    if unknown:
        raise ConfigError(f"checkpoint.exclude_from_loading has unknown parts {sorted(unknown)}")
    if cfg.activation_checkpoint.mode == "memory_budget" and not cfg.compile.enable:
        raise ConfigError(
            "activation_checkpoint.mode = 'memory_budget' works through torch.compile: "
            "set compile.enable = true"
        )
    check_converters(
        cfg.model.converters, cfg.quantize.linear, cfg.compile.blocks, p.tensor_parallel_degree
    )
    check_lora(cfg.lora)
    check_optimizer(cfg.optimizer, cfg.model.converters, cfg.parallelism.fsdp_cpu_offload)
    check_chat_config(cfg.data, cfg.model.attn_mask_type)
    check_resilience(cfg.resilience, cfg.checkpoint)
    check_hf_save(cfg.checkpoint, cfg.model.converters)
    check_fault_tolerance(cfg.fault_tolerance, p, cfg.resilience)
    if not set(cfg.compile.components) <= {"model", "loss"}:
        raise ConfigError(f"compile.components = {cfg.compile.components}: choose from model, loss")


def _get(cfg: JobConfig, dotted: str) -> Any:
    section, key = _resolve_key(cfg, dotted, source="titan")
    return getattr(section, key)


def _positive(cfg: JobConfig, *dotted: str) -> None:
    for d in dotted:
        if _get(cfg, d) <= 0:
            raise ConfigError(f"{d} = {_get(cfg, d)} must be > 0")


def _non_negative(cfg: JobConfig, *dotted: str) -> None:
    for d in dotted:
        if _get(cfg, d) < 0:
            raise ConfigError(f"{d} = {_get(cfg, d)} must be >= 0")
