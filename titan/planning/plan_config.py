"""The planner's candidates as titan sees them: a request and a candidate layout, the TOML keys
a candidate sets (titan's config names), the JobConfig holding them that titan's own start-up
checks judge, and their verdict."""

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from titan.config.checks import converters_of
from titan.config.job_config import JobConfig, Parallelism
from titan.models.llama3.args import FLAVORS, ModelArgs
from titan.models.llama3.build import check_layout
from titan.parallelisms.parallel_dims import ParallelDims, resolve_parallel_dims
from titan.parallelisms.pipeline import num_stages
from titan.planning.memory_model import GIB, MemoryEstimate, estimate_memory
from titan.planning.throughput_model import GPU, StepTime
from titan.trainer.runtime import grad_accumulation_steps


def parse_tokens(text: str) -> int:
    """'16M' -> 16 x 2^20, '64K' -> 65536, '4096' -> 4096."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    return int(float(number) * scale)


@dataclass(frozen=True)
class Request:
    """What to plan: a flavor on `gpus` GPUs, sequences of seq_len, a global batch in tokens."""

    flavor: str
    gpus: int
    seq_len: int
    global_batch_tokens: int
    gpu: GPU
    memory_gib: float
    float8: str = "auto"  # auto (both where the GPU has float8), on, off
    reserve_gib: float = 2.0  # the CUDA context and NCCL (memory_model.LEAVES_OUT)

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor {self.flavor!r} is not one of {', '.join(FLAVORS)}")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(
                f"the global batch of {self.global_batch_tokens} tokens is not a whole number of "
                f"{self.seq_len}-token sequences"
            )
        if self.float8 == "on" and not self.gpu.float8:
            raise ValueError(f"--float8 on: {self.gpu.name} has no float8 tensor cores")

    @functools.cached_property
    def args(self) -> ModelArgs:
        """The flavor's architecture with RoPE sized to seq_len, as titan builds it."""
        return dataclasses.replace(FLAVORS[self.flavor], max_seq_len=self.seq_len)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step (training.global_batch_size)."""
        return self.global_batch_tokens // self.seq_len

    @property
    def budget(self) -> float:
        """Bytes a rank's estimate may reach."""
        return (self.memory_gib - self.reserve_gib) * GIB


@dataclass(frozen=True)
class Candidate:
    """A layout to try: its [parallelism] section (explicit degrees) and the dims titan resolves
    from it, with the training settings the planner varies."""

    parallelism: Parallelism
    dims: ParallelDims
    local_batch_size: int
    ac_mode: str
    float8: bool
    compile_blocks: bool = True  # False where titan refuses compiled blocks for the layout


@dataclass
class Plan:
    candidate: Candidate
    memory: MemoryEstimate
    time: StepTime | None = None
    accumulation: int = 1


def job_config(req: Request, cand: Candidate) -> JobConfig:
    """titan's defaults with the candidate's TOML keys (toml_tables) on a CUDA bf16 run: titan's
    checks judge exactly what the printed block sets."""
    tables = toml_tables(req, cand)
    tables["training"].update(device="cuda", mixed_precision_param="bfloat16")
    sections = {}
    for table, values in tables.items():
        items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items())
        sections[table.split(".")[0]] = _section(table, items)
    return dataclasses.replace(_BASE, **sections)


_BASE = JobConfig()


@functools.lru_cache(maxsize=65536)
def _section(table: str, items: tuple) -> Any:
    """The top-level section holding `table` ("quantize.linear.float8": a Quantize) with the
    items set over titan's defaults (cached: candidates share most sections; read-only)."""
    path = table.split(".")
    section = functools.reduce(getattr, path, _BASE)
    section = dataclasses.replace(
        section, **{k: list(v) if isinstance(v, tuple) else v for k, v in items}
    )
    for depth in range(len(path) - 1, 0, -1):  # nest back up to the top-level section
        parent = functools.reduce(getattr, path[:depth], _BASE)
        section = dataclasses.replace(parent, **{path[depth]: section})
    return section


def titan_rejects(req: Request, cand: Candidate) -> str | None:
    """titan's own start-up message for a layout it refuses (None: accepted): the run's layout
    check (degrees, the model's layout checks, the pipeline schedule), then its gradient
    accumulation."""
    cfg = job_config(req, cand)
    try:
        dims = check_layout(cfg, req.args, torch.device("cuda"), req.gpus)
        grad_accumulation_steps(cfg.training, dims.dp)
    except ValueError as e:  # titan's ConfigError is a ValueError
        return str(e).removeprefix("[parallelism] ")  # the check's own words, without the table
    return None


def accept(req: Request, cand: Candidate) -> Candidate | str:
    """The candidate as titan runs it (compiled blocks where titan allows them, else only the
    loss compiled), or titan's reason for refusing it."""
    if titan_rejects(req, cand) is None:
        return cand
    eager = dataclasses.replace(cand, compile_blocks=False)
    reason = titan_rejects(req, eager)
    return eager if reason is None else reason


def toml_tables(req: Request, cand: Candidate) -> dict[str, dict]:
    """The candidate as titan's config keys, by table (what the TOML block prints)."""
    p, d = cand.parallelism, cand.dims
    par = {
        "data_parallel_replicate_degree": d.dp_replicate,
        "data_parallel_shard_degree": d.dp_shard,
        "tensor_parallel_degree": d.tp,
        "context_parallel_degree": d.cp,
        "pipeline_parallel_degree": d.pp,
    }
    if d.pp > 1:
        par["pipeline_parallel_schedule"] = p.pipeline_parallel_schedule
        par["pipeline_parallel_microbatch_size"] = p.pipeline_parallel_microbatch_size
        par["pipeline_parallel_grad_reduce"] = p.pipeline_parallel_grad_reduce
        # the split written out in full, even where titan's defaults give the same stages: a
        # base config's values would otherwise stay, and TOML cannot unset a key (an explicit
        # split wins over layers_per_stage and the lighter ends, so a plain one is [])
        names = list(p.pipeline_parallel_module_names_per_stage)
        if not names:
            lps = _layers_per_stage(req.args.n_layers, p)
            if lps is not None:
                par["pipeline_parallel_layers_per_stage"] = lps
            par["pipeline_parallel_first_stage_less_layers"] = (
                p.pipeline_parallel_first_stage_less_layers
            )
            par["pipeline_parallel_last_stage_less_layers"] = (
                p.pipeline_parallel_last_stage_less_layers
            )
        par["pipeline_parallel_module_names_per_stage"] = names
    tables = {
        "model": {"flavor": req.flavor, "converters": ["float8"] if cand.float8 else []},
        "training": {
            "local_batch_size": cand.local_batch_size,
            "global_batch_size": req.global_batch,
            "seq_len": req.seq_len,
        },
        "parallelism": par,
        "activation_checkpoint": {"mode": cand.ac_mode, "selective_ac_option": "op"},
        "compile": {
            "enable": True,
            "components": ["model", "loss"] if cand.compile_blocks else ["loss"],
        },
    }
    if cand.float8:
        tables["quantize.linear.float8"] = {
            "recipe_name": "tensorwise", "enable_fsdp_float8_all_gather": True,
        }  # fmt: skip
    return tables


def _layers_per_stage(n_layers: int, par: Parallelism) -> int | None:
    """A pipeline_parallel_layers_per_stage giving the layout's stages (None: none does)."""
    stages = num_stages(par, n_layers)
    lps = math.ceil(n_layers / stages)
    split = dataclasses.replace(par, pipeline_parallel_layers_per_stage=lps)
    return lps if num_stages(split, n_layers) == stages else None


def toml_block(req: Request, p: Plan, rank: int) -> str:
    """The plan as TOML to paste into (or merge with) a titan config."""
    t = p.time
    lines = [
        f"# rank {rank}: {req.flavor} on {req.gpus} x {req.gpu.name}: {t.step:.2f} s/step, "
        f"{t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {t.mfu:.1%}, "
        f"{p.memory.total / GIB:.1f} GiB/GPU estimated"
    ]
    for table, values in toml_tables(req, p.candidate).items():
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        if table == "parallelism" and p.candidate.dims.pp > 1:
            explicit = values["pipeline_parallel_module_names_per_stage"]
            if "pipeline_parallel_layers_per_stage" not in values and not explicit:
                lines.append("# and no pipeline_parallel_layers_per_stage (one stage per rank)")
    return "\n".join(lines) + "\n"


def overrides(tables: dict[str, Any], prefix: str = "") -> list[str]:
    """Tables (toml_tables', or parsed TOML's nested ones) as titan's `--section.key value`
    command-line overrides."""
    out = []
    for key, value in tables.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out += overrides(value, f"{dotted}.")
            continue
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        out += [f"--{dotted}", str(value)]
    return out


def config_estimate(
    cfg: JobConfig,
    world_size: int,
    pp_rank: int | None = None,
    compiled_loss: bool = False,
    cp_rank: int | None = None,
) -> MemoryEstimate:
    """memory_model's estimate for a titan config at world_size ranks, of pipeline rank pp_rank
    and context-parallel rank cp_rank (None: the ones that peak); the loss eager, as the dry run
    traces it, unless compiled_loss (what a run of a config whose compile.components has "loss"
    holds)."""
    t, p = cfg.training, cfg.parallelism
    dims = resolve_parallel_dims(p, world_size)
    args = dataclasses.replace(
        FLAVORS[cfg.model.flavor], max_seq_len=t.seq_len, attn_mask_type=cfg.model.attn_mask_type
    )
    if cfg.model.vocab_size != -1:
        args = dataclasses.replace(args, vocab_size=cfg.model.vocab_size)
    f8 = converters_of(cfg).float8
    ac = cfg.activation_checkpoint
    (_, accumulation), *_ = grad_accumulation_steps(t, dims.dp)
    return estimate_memory(
        args, p, dims, t.seq_len, t.local_batch_size, ac.mode, f8 is not None,
        ac.selective_ac_option, f8 is not None and f8.enable_fsdp_float8_all_gather, compiled_loss,
        grad_accumulation=accumulation, pp_rank=pp_rank,
        moment_bytes=4 if cfg.optimizer.state_dtype == "bfloat16" else 8, cp_rank=cp_rank,
        loss_chunk_tokens=t.loss_chunk_tokens, activation_offload=ac.offload,
        muon=cfg.optimizer.name == "Muon",
    )  # fmt: skip
