"""Pipeline parallel, model-independent: schedules, stage placement, start-up checks.

A run of `pipeline_parallel_degree` (pp) ranks splits the model into stages. Single-stage
schedules (GPipe, 1F1B) give each rank one stage; looped schedules (Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble) give rank r the stages r, r + pp, r + 2 pp, ...; V schedules
(ZBVZeroBubble, DualPipeV) give rank r exactly two, r and 2 pp - 1 - r, so the first and last
stage share rank 0; a CSV schedule's rows say which rank runs which stage. Each
data-parallel rank's local batch is cut into micro-batches of
`pipeline_parallel_microbatch_size` sequences that flow through the stages. With FSDP,
`pipeline_parallel_grad_reduce` says when a stage's gradients are reduce-scattered: once per
step after the stage's last backward (torch's stage), or after every micro-batch's backward.
"""

import csv
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _Action,
    _PipelineScheduleRuntime,
    get_schedule_class,
)

from titan.compat import decide_static_shapes_on_fake_backend, stage_metadata
from titan.config.job_config import Parallelism


@dataclass(frozen=True)
class ScheduleKind:
    placement: str  # "single" (one stage per rank), "loop", "v", or "csv" (as the file says)
    # splits backward into input- and weight-gradient passes (B and W): FSDP must then keep
    # parameters gathered from forward to the last W, or the W pass sees freed weights
    zero_bubble: bool = False
    # micro-batches per data-parallel rank must be at least the number of stages
    needs_microbatches_ge_stages: bool = False


SCHEDULES = {
    "GPipe": ScheduleKind("single"),
    "1F1B": ScheduleKind("single", needs_microbatches_ge_stages=True),
    "Interleaved1F1B": ScheduleKind("loop"),
    "LoopedBFS": ScheduleKind("loop"),
    "InterleavedZeroBubble": ScheduleKind("loop", zero_bubble=True),
    "ZBVZeroBubble": ScheduleKind("v", zero_bubble=True),
    "DualPipeV": ScheduleKind("v", zero_bubble=True, needs_microbatches_ge_stages=True),
}


@dataclass(frozen=True)
class CsvSchedule:
    """A schedule read from a CSV file: one row of actions (e.g. 0F0, 1B0, 0W1) per pp rank."""

    stages: list[list[int]]  # the stages each rank's actions name, in order
    splits_backward: bool  # has input/weight-gradient (I/W) actions
    has_comms: bool  # lists its own send/receive actions


def read_csv_schedule(path: str) -> CsvSchedule:
    rows = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            try:
                rows.append([a for a in map(_Action.from_str, row) if a is not None])
            except RuntimeError as e:
                raise ValueError(
                    f"pipeline_parallel_schedule_csv {path!r}, row {line}: {e}"
                ) from None
    types = {a.computation_type.value for row in rows for a in row}
    return CsvSchedule(
        stages=[sorted({a.stage_index for a in row if a.is_compute_op}) for row in rows],
        splits_backward=bool(types & {"I", "W"}),
        has_comms=bool(types & {"SEND_F", "RECV_F", "SEND_B", "RECV_B"}),
    )


def schedule_kind(cfg: Parallelism) -> ScheduleKind:
    if cfg.pipeline_parallel_schedule_csv:
        csv_schedule = read_csv_schedule(cfg.pipeline_parallel_schedule_csv)
        return ScheduleKind("csv", zero_bubble=csv_schedule.splits_backward)
    return SCHEDULES[cfg.pipeline_parallel_schedule]


def num_stages(cfg: Parallelism, n_layers: int) -> int:
    """Stages in all: from the explicit module lists, from layers_per_stage, from a CSV's
    actions, or one per rank (two for V schedules)."""
    if cfg.pipeline_parallel_module_names_per_stage:
        return len(cfg.pipeline_parallel_module_names_per_stage)
    if cfg.pipeline_parallel_layers_per_stage is not None:
        return math.ceil(n_layers / cfg.pipeline_parallel_layers_per_stage)
    if cfg.pipeline_parallel_schedule_csv:
        stages = read_csv_schedule(cfg.pipeline_parallel_schedule_csv).stages
        return 1 + max((s for rank in stages for s in rank), default=-1)
    pp = cfg.pipeline_parallel_degree
    return 2 * pp if schedule_kind(cfg).placement == "v" else pp


def rank_stages(cfg: Parallelism, n_stages: int) -> list[list[int]]:
    """The stage indices each pipeline rank holds, in order (torch's stage-to-rank mapping)."""
    pp = cfg.pipeline_parallel_degree
    placement = schedule_kind(cfg).placement
    if placement == "csv":
        return read_csv_schedule(cfg.pipeline_parallel_schedule_csv).stages
    if placement == "v":
        return [[r, 2 * pp - 1 - r] for r in range(pp)]
    return [list(range(r, n_stages, pp)) for r in range(pp)]


def check_pipeline(
    cfg: Parallelism, n_layers: int, local_batch_size: int, compile_blocks: bool = False
) -> None:
    """Every constraint of the schedule and split, before any process group starts."""
    pp = cfg.pipeline_parallel_degree
    name = cfg.pipeline_parallel_schedule
    csv_path = cfg.pipeline_parallel_schedule_csv
    if csv_path and not Path(csv_path).is_file():
        raise ValueError(
            f"parallelism.pipeline_parallel_schedule_csv = {csv_path!r}: no such file; give the "
            "path of a schedule CSV (one row of actions per pipeline rank)"
        )
    if pp == 1:
        return
    kind = schedule_kind(cfg)
    what = f"pipeline_parallel_schedule_csv {csv_path!r}" if csv_path else name
    n_stages = num_stages(cfg, n_layers)
    mbs = cfg.pipeline_parallel_microbatch_size
    if local_batch_size % mbs:
        raise ValueError(
            f"training.local_batch_size {local_batch_size} is not divisible by "
            f"parallelism.pipeline_parallel_microbatch_size {mbs}: make it a multiple"
        )
    n_micro = local_batch_size // mbs
    if n_stages > n_layers:
        raise ValueError(
            f"{n_stages} pipeline stages but the model has {n_layers} blocks: every stage needs a "
            "block; lower pipeline_parallel_degree or raise pipeline_parallel_layers_per_stage"
        )
    if kind.placement == "single" and n_stages != pp:
        raise ValueError(
            f"schedule {what} runs one stage per rank, but the split gives {n_stages} stages for "
            f"pipeline_parallel_degree {pp}: unset pipeline_parallel_layers_per_stage (or make it "
            f"{math.ceil(n_layers / pp)}), or use Interleaved1F1B for several stages per rank"
        )
    if kind.placement == "loop" and n_stages % pp:
        raise ValueError(
            f"schedule {what} places stages round-robin, but {n_stages} stages do not divide "
            f"over pipeline_parallel_degree {pp}: choose layers_per_stage so that "
            f"ceil(n_layers / layers_per_stage) is a multiple of {pp}"
        )
    if kind.placement == "csv":
        _check_csv(cfg, n_stages)
    if kind.placement == "v" and n_stages != 2 * pp:
        raise ValueError(
            f"schedule {what} needs exactly two stages per rank ({2 * pp} stages for "
            f"pipeline_parallel_degree {pp}), but the split gives {n_stages}: unset "
            "pipeline_parallel_layers_per_stage or set it to "
            f"{math.ceil(n_layers / (2 * pp))}"
        )
    if kind.needs_microbatches_ge_stages and n_micro < n_stages:
        raise ValueError(
            f"schedule {what} needs at least as many micro-batches as stages ({n_stages}), but "
            f"training.local_batch_size {local_batch_size} / pipeline_parallel_microbatch_size "
            f"{mbs} = {n_micro}: raise local_batch_size or lower the microbatch size"
        )
    rounds = max(1, n_micro // pp)
    if kind.placement in ("loop", "v") and n_micro % rounds:
        raise ValueError(
            f"schedule {what} runs micro-batches in rounds of {pp}: {n_micro} micro-batches is "
            f"not a multiple of {rounds} rounds; use a multiple of {pp} micro-batches"
        )
    if kind.zero_bubble and compile_blocks:
        raise ValueError(
            f"schedule {what} splits backward into input and weight gradients, which torch "
            "(2.13) cannot do through compiled blocks (the input-gradient pass fails): use "
            "1F1B, Interleaved1F1B, GPipe or LoopedBFS with compile, or turn compile off"
        )
    if kind.zero_bubble and cfg.pipeline_parallel_grad_reduce == "microbatch":
        raise ValueError(
            f"schedule {what} splits backward into input and weight gradients, and FSDP can "
            "reduce-scatter a micro-batch's gradients only after a whole backward: set "
            "pipeline_parallel_grad_reduce = 'stage', or use 1F1B, Interleaved1F1B, GPipe or "
            "LoopedBFS"
        )
    if kind.zero_bubble and cfg.fsdp_reshard_after_forward == "always":
        raise ValueError(
            f"schedule {what} computes weight gradients after the input gradients, when FSDP "
            "has already freed the gathered weights with fsdp_reshard_after_forward = 'always' "
            "(silently wrong gradients): use 'default' or 'never'"
        )


def _check_csv(cfg: Parallelism, n_stages: int) -> None:
    path, pp = cfg.pipeline_parallel_schedule_csv, cfg.pipeline_parallel_degree
    stages = read_csv_schedule(path).stages
    if len(stages) != pp:
        raise ValueError(
            f"pipeline_parallel_schedule_csv {path!r} has {len(stages)} rows but "
            f"pipeline_parallel_degree is {pp}: write one row of actions per pipeline rank"
        )
    named = sorted(s for rank in stages for s in rank)
    if named != list(range(n_stages)):
        raise ValueError(
            f"pipeline_parallel_schedule_csv {path!r} runs stages {named}, but the split has "
            f"{n_stages} stages (0 to {n_stages - 1}): each stage must be run by exactly one rank"
        )


def stage_log(stages: list[list[int]], module_names: list[list[str]]) -> str:
    """Which rank holds which stages and modules, for the start-up log."""
    lines = []
    for rank, held in enumerate(stages):
        parts = [f"stage {s} [{_compact(module_names[s])}]" for s in held]
        lines.append(f"  pp rank {rank}: " + "; ".join(parts))
    return "\n".join(lines)


def _compact(names: list[str]) -> str:
    """'layers.0 layers.1 layers.2' -> 'layers.0-2' (other names kept)."""
    out, run = [], []
    for n in [*names, None]:
        if (
            n is not None
            and n.startswith("layers.")
            and (not run or int(n.split(".")[1]) == run[-1] + 1)
        ):
            run.append(int(n.split(".")[1]))
            continue
        if run:
            out.append(f"layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run = []
        if n is not None:
            if n.startswith("layers."):
                run = [int(n.split(".")[1])]
            else:
                out.append(n)
    return ", ".join(out)


def build_schedule(
    parts: list[nn.Module],
    stage_ids: list[int],
    n_stages: int,
    mesh: DeviceMesh,
    device: torch.device,
    cfg: Parallelism,
    local_batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    static_shapes: list[dict] | None = None,
):
    """The schedule that runs this rank's stage modules over `mesh` (the pp mesh), each
    local batch cut into micro-batches of pipeline_parallel_microbatch_size. Without
    static_shapes each stage learns its input shapes from its neighbour at the first step."""
    n_microbatches = local_batch_size // cfg.pipeline_parallel_microbatch_size
    group = mesh.get_group()
    # static_shapes: each stage's example inputs/outputs, so that no shapes are exchanged
    shapes = static_shapes or [{} for _ in parts]
    per_microbatch = cfg.pipeline_parallel_grad_reduce == "microbatch"
    stages = []
    for part, stage_id, kw in zip(parts, stage_ids, shapes, strict=True):
        args = (stage_id, n_stages, device)
        kwargs = {"group": group, **stage_metadata(kw)}
        if per_microbatch and isinstance(part, FSDPModule):
            keep = cfg.fsdp_reshard_after_forward != "always"
            stages.append(MicrobatchReduceStage(part, *args, keep_gathered=keep, **kwargs))
        else:
            stages.append(PipelineStage(part, *args, **kwargs))
    # The loss function returns sum / global target count already: no scaling by micro-batches.
    if cfg.pipeline_parallel_schedule_csv:
        schedule = _PipelineScheduleRuntime(
            stages, n_microbatches, loss_fn=loss_fn, scale_grads=False
        )
        if static_shapes is not None:
            decide_static_shapes_on_fake_backend(schedule)
        csv_schedule = read_csv_schedule(cfg.pipeline_parallel_schedule_csv)
        fmt = "compute_comms" if csv_schedule.has_comms else "compute_only"
        schedule._load_csv(cfg.pipeline_parallel_schedule_csv, format=fmt)
        return _losses_only(schedule)
    cls = get_schedule_class(cfg.pipeline_parallel_schedule)
    if issubclass(cls, PipelineScheduleSingle):
        schedule = cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        assert issubclass(cls, PipelineScheduleMulti)
        schedule = cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if static_shapes is not None:
        decide_static_shapes_on_fake_backend(schedule)
    return _losses_only(schedule)


class _Plain(nn.Module):
    """Runs the FSDP stage inside it: torch's stage sees no FSDPModule, so leaves FSDP's
    gradient sync as MicrobatchReduceStage sets it."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        return self.stage(*args, **kwargs)


class MicrobatchReduceStage(PipelineStage):
    """A pipeline stage whose FSDP module reduce-scatters its gradients after every
    micro-batch's backward and accumulates them sharded, in fp32 (FSDP's reduce dtype).

    torch's PipelineStage turns FSDP's gradient sync off before each backward of an FSDP module
    it holds, so the module accumulates unsharded fp32 gradients until the stage's last
    backward of the step (then one reduce-scatter). This stage hands torch the module in a plain
    wrapper and sets FSDP's own knobs before each backward instead: sync on (with HSDP, the
    all-reduce across replicas too), gathered weights kept until the stage's last backward
    (`keep_gathered`, as torch's stage keeps them), and each backward finished as a last one,
    so that no reduce-scatter buffer outlives it.
    """

    def __init__(self, fsdp_stage: nn.Module, *args, keep_gathered: bool, **kwargs):
        super().__init__(_Plain(fsdp_stage), *args, **kwargs)
        self.fsdp_stage = fsdp_stage
        self.keep_gathered = keep_gathered

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        fsdp = self.fsdp_stage
        fsdp.set_requires_gradient_sync(True)  # with HSDP also the all-reduce across replicas
        fsdp.set_reshard_after_backward(last_backward or not self.keep_gathered)
        fsdp.set_is_last_backward(True)
        return super().backward_one_chunk(
            bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward
        )


def _losses_only(schedule):
    """The schedule's step() keeps no outputs: the last stage would otherwise hold every
    micro-batch's logits until the step ends, and titan reads only the losses."""
    if "return_outputs" in inspect.signature(schedule.step).parameters:  # torch >= 2.9
        schedule.step = functools.partial(schedule.step, return_outputs=False)
    return schedule
