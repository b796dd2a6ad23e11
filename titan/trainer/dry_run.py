"""Dry runs by tracing (COMM_MODE=fake_backend): one process acts as a rank of the config's world
and runs its real step (shapes, batch, AC, float8, pipeline schedule, context parallel) on fake
tensors with the fake process group, so nothing is allocated and no matmul runs; the memory
tracer (memory_tracer.py) gives the rank's peak memory by part, reported here."""

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from titan.config.job_config import JobConfig
from titan.errors import ConfigError
from titan.logger import logger
from titan.parallelisms.distributed import clip_grad_norm_tensor_, fake_mode
from titan.trainer.memory_tracer import (
    DENSE_MASKS,
    GIB,
    HOST,
    PARTS,
    static_state,
    tensor_bytes,
    tracing,
)


@dataclass
class MemoryEstimate:
    rank: int
    label: str  # "rank 0", or "pp rank 0" and "pp rank 7" for the pipeline's ends
    peak: dict[str, int]  # bytes of each part at the peak (PARTS)
    dense_masks: int = 0  # bytes of dense masks live at the peak (not in the peak)
    # bytes this rank stores once the gradients are complete (before the optimizer step):
    # parameters, gradients and optimizer state, exact
    held: dict[str, int] = field(default_factory=dict)
    trace_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # FSDP's gradient reduce-scatters in the step, and the bytes they reduce (their inputs)
    reduce_scatters: int = 0
    reduce_scatter_bytes: int = 0
    # what offload keeps in host memory, by part, at the host's own peak (not in `peak`)
    host: dict[str, int] = field(default_factory=dict)
    # the optimizer step's own rise above what the rank holds when it starts (clipping, then
    # the step: foreach intermediates, Muon's gathered matrices and Newton-Schulz), at its peak
    optimizer_step: int = 0

    @property
    def total(self) -> int:
        return sum(self.peak.values())


def zero_gradients(model: nn.Module) -> None:
    """Every trainable parameter gets a zero gradient (so an optimizer step makes its state)."""
    for p in model.parameters():
        if p.requires_grad:  # frozen ones (LoRA's base) have no gradient
            p.grad = torch.zeros_like(p)


def write_json(path: str, estimates: list[MemoryEstimate], memory_gib: float, fits: bool) -> None:
    """The estimates in bytes, for scripts and tests (dump_folder/dry_run.json)."""
    ranks = [dataclasses.asdict(e) | {"total": e.total} for e in estimates]
    body = {"memory_gib": memory_gib, "fits": fits, "ranks": ranks}
    with open(path, "w") as f:
        json.dump(body, f, indent=1)


def report(estimates: list[MemoryEstimate], memory_gib: float, header: str) -> tuple[str, bool]:
    """The report's lines, and whether every traced rank fits in memory_gib."""
    lines = [header]
    for e in estimates:
        lines.append(f"  {e.label} (rank {e.rank}; traced in {e.trace_s:.1f} s): peak "
                     f"{e.total / GIB:.2f} GiB")  # fmt: skip
        for part in PARTS:
            if e.peak[part]:
                lines.append(f"    {part:>22}: {e.peak[part] / GIB:9.3f} GiB")
        if e.host:
            parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in e.host.items() if v >= 2**20)
            lines.append(f"    {'host (offloaded)':>22}: {sum(e.host.values()) / GIB:9.3f} GiB "
                         f"({parts}; not in the peak)")  # fmt: skip
        if e.dense_masks >= 2**20:
            lines.append(f"    (left out: {e.dense_masks / GIB:.3f} GiB of {DENSE_MASKS}, "
                         "CPU only: flex attention's block mask replaces them on GPU)")  # fmt: skip
        if e.reduce_scatters:
            lines.append(f"    FSDP gradient reduce-scatters: {e.reduce_scatters} a step, "
                         f"{e.reduce_scatter_bytes / GIB:.3f} GiB in")  # fmt: skip
        if e.optimizer_step >= 2**20:
            lines.append(f"    optimizer step: {e.optimizer_step / GIB:.3f} GiB above what it "
                         "starts from, at its own highest")  # fmt: skip
        lines.extend(f"    note: {n}" for n in e.notes)
    worst = max(estimates, key=lambda e: e.total)
    over = worst.total / GIB - memory_gib
    fits = over <= 0
    if not fits:
        lines.append(
            f"  DOES NOT FIT: {worst.label} peaks at {worst.total / GIB:.2f} GiB, {over:.2f} GiB "
            f"over the {memory_gib:g} GiB device (dry_run.memory_gib): shard more (FSDP, TP, "
            "PP, CP), checkpoint activations, or lower training.local_batch_size"
        )
    else:
        lines.append(f"  fits: the highest peak ({worst.label}) is {worst.total / GIB:.2f} GiB of "
                     f"{memory_gib:g} GiB, {-over:.2f} GiB free")  # fmt: skip
    return "\n".join(lines), fits


def traceable(cfg: JobConfig, ddp: bool) -> JobConfig:
    """The config a trace runs: the GPU run's optimizer (fused AdamW, unless the config says),
    eager (inductor's kernels are built from real compiles), no TensorBoard or W&B run (so a
    plain install dry-runs every config). DDP (`ddp`) cannot be traced."""
    if ddp:
        raise ConfigError(
            "a dry run cannot trace DDP (data_parallel_replicate_degree > 1 with "
            "data_parallel_shard_degree = 1): torch's DDP reducer reads parameter values and "
            "all-reduce results in C++; dry-run an FSDP or HSDP layout instead"
        )
    if cfg.optimizer.implementation == "auto":
        cfg = dataclasses.replace(
            cfg, optimizer=dataclasses.replace(cfg.optimizer, implementation="fused")
        )
    if cfg.compile.enable:
        logger.info("dry run: traced eagerly (compile off); compiled blocks fuse elementwise ops "
                    "and usually hold less activation memory than this estimate")  # fmt: skip
        cfg = dataclasses.replace(cfg, compile=dataclasses.replace(cfg.compile, enable=False))
    if cfg.metrics.enable_tensorboard or cfg.metrics.enable_wandb:  # a trace logs no steps
        off = dataclasses.replace(cfg.metrics, enable_tensorboard=False, enable_wandb=False)
        cfg = dataclasses.replace(cfg, metrics=off)
    return cfg


def traced_ranks(cfg: JobConfig, world_size: int) -> list[tuple[int, str]]:
    """(rank, label) of each rank to trace: cfg.dry_run.ranks, else rank 0 and, pipelined, the
    last pipeline rank too (the pipeline is the outermost mesh dimension). The first holds the
    embedding and the most micro-batches in flight, the last the output layer and the loss; a
    rank between holds fewer micro-batches than the first, and neither end layer."""
    if cfg.dry_run.ranks:
        bad = [r for r in cfg.dry_run.ranks if not 0 <= r < world_size]
        if bad:
            raise ConfigError(f"dry_run.ranks = {bad}: ranks are 0..{world_size - 1}")
        return [(r, f"rank {r}") for r in cfg.dry_run.ranks]
    pp = cfg.parallelism.pipeline_parallel_degree
    if pp == 1:
        return [(0, "rank 0")]
    return [(0, "pp rank 0"), ((pp - 1) * (world_size // pp), f"pp rank {pp - 1}")]


def _notes(trainer) -> list[str]:
    """What the eager trace holds that the configured (compiled) run would not."""
    compiled = trainer.compile_as_written
    if trainer.cfg.training.loss_chunk_tokens or not (
        compiled.enable and "loss" in compiled.components
    ):
        return []  # the chunked loss holds the same eager or compiled
    cfg, dims = trainer.cfg, trainer.parallel_dims
    batch = cfg.training.local_batch_size
    if dims.pp > 1:
        batch = cfg.parallelism.pipeline_parallel_microbatch_size
    vocab = trainer.model_args.vocab_size // (dims.tp if trainer.loss_parallel else 1)
    log_probs = batch * cfg.training.seq_len // dims.cp * vocab * 4
    return [f"the eager loss holds fp32 log-probabilities, {log_probs / GIB:.2f} GiB a micro-batch "
            "at the peak; the compiled loss (compile.components) does not"]  # fmt: skip


class CountReduceScatters(TorchDispatchMode):
    """Counts the c10d reduce-scatters (FSDP's gradient reductions; tensor parallel's go through
    the functional collectives) and their input bytes."""

    def __init__(self):
        super().__init__()
        self.count = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented  # DTensor and float8 tensors run their inner ops, seen here
        if func.namespace == "c10d" and "reduce_scatter" in func.__name__:
            self.count += 1
            self.bytes += tensor_bytes([args[1]]) if torch.is_tensor(args[1]) else 0
        return func(*args, **(kwargs or {}))


def trace_step(trainer, rank: int, label: str) -> MemoryEstimate:
    """Trace one training step of `trainer` (a titan.trainer.trainer.Trainer built in a dry
    run) after a first step made the optimizer state, as every step after the first runs."""
    start = time.perf_counter()
    microbatches = trainer.next_microbatches(iter(trainer.dataloader))
    model, optimizer = trainer.model, trainer.optimizer
    with fake_mode():
        zero_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = list(model.parameters())
    cfg = trainer.cfg
    host = frozenset()
    if cfg.parallelism.fsdp_cpu_offload:  # FSDP keeps them on the host; the optimizer runs there
        host = frozenset(("parameters", "gradients", "optimizer state", "optimizer temporaries"))
    with tracing(model, static_state(model, optimizer), host) as tracer:
        with CountReduceScatters() as reduce_scatters:
            trainer.forward_backward(microbatches)
        held = {name: tensor_bytes(ts) for name, ts in static_state(model, optimizer).items()}
        held["gradients"] = tensor_bytes([p.grad for p in params if p.grad is not None])
        tracer.optimizer_phase, tracer.optimizer_peak = True, tracer.total
        step_start = tracer.total
        if hasattr(trainer, "ft"):  # a torchft group: its gradient buckets, summed across groups
            trainer.ft.sum_grads(trainer.local_grads())
        clip_grad_norm_tensor_(params, trainer.cfg.training.max_norm, trainer.pp_mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = {k: v for k, v in tracer.peak.items() if k != DENSE_MASKS}
    notes = _notes(trainer)
    if trainer.cfg.activation_checkpoint.mode == "memory_budget":
        notes.append("activation_checkpoint.mode = 'memory_budget' acts through compile: traced "
                     "without checkpointing (an upper bound)")  # fmt: skip
    return MemoryEstimate(
        rank, label, peak, dense_masks=tracer.peak[DENSE_MASKS], held=held,
        trace_s=time.perf_counter() - start, notes=notes,
        reduce_scatters=reduce_scatters.count, reduce_scatter_bytes=reduce_scatters.bytes,
        host={k.removeprefix(HOST): v for k, v in tracer.host_peak.items()},
        optimizer_step=tracer.optimizer_peak - step_start,
    )  # fmt: skip


def main(cfg: JobConfig, trainer_cls: type) -> int:
    """Trace one step of each rank dry_run.traced_ranks names (forked processes, as many at a
    time as there are cores) and report its peak memory; 1 when one does not fit."""
    start = time.perf_counter()
    ranks = traced_ranks(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if len(ranks) == 1:
        results = [_trace_rank(trainer_cls, cfg, *ranks[0])]
    else:  # a fresh process per rank: torch's meshes outlive their process group
        workers = min(len(ranks), os.cpu_count() or 1)
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=fork) as pool:
            args = (
                [trainer_cls] * len(ranks),
                [cfg] * len(ranks),
                [r for r, _ in ranks],
                [label for _, label in ranks],
            )
            results = list(pool.map(_trace_rank, *args))
    estimates = [e for e, _ in results]
    text, fits = report(estimates, cfg.dry_run.memory_gib, results[0][1])
    out = Path(cfg.job.dump_folder) / "dry_run.json"
    write_json(str(out), estimates, cfg.dry_run.memory_gib, fits)
    logger.info(f"{text}\n  dry run took {time.perf_counter() - start:.1f} s")
    return 0 if fits else 1


def _trace_rank(
    trainer_cls: type, cfg: JobConfig, rank: int, label: str
) -> tuple[MemoryEstimate, str]:
    """(the traced step's memory estimate, the report's header) of this process acting as rank."""
    os.environ["RANK"] = str(rank)
    trainer = trainer_cls(cfg)
    estimate = trace_step(trainer, rank, label)
    dims = trainer.parallel_dims
    header = (f"dry run of {cfg.model.flavor} on {dims.world_size} ranks ({dims.describe()}): "
              f"{trainer.n_params:,} parameters; the GPU run's dtypes, eager")  # fmt: skip
    dist.destroy_process_group()
    return estimate, header
