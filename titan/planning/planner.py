"""Layout planner: the parallel layouts titan accepts for a flavor on N GPUs (titan's own checks
decide, see plan_config), their analytic memory (memory_model) and step time (throughput_model),
ranked by step time among those that fit; when none fits, what would make one fit."""

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from titan.config.job_config import Parallelism
from titan.models.llama3.args import ModelArgs
from titan.models.llama3.pipeline import split_module_names
from titan.parallelisms.parallel_dims import ParallelDims, resolve_parallel_dims
from titan.parallelisms.pipeline import SCHEDULES
from titan.planning.memory_model import GIB, MemoryEstimate, estimate_memory, state_bytes
from titan.planning.model_sizes import float8_linears, pipeline_split
from titan.planning.plan_config import Candidate, Plan, Request, accept
from titan.planning.throughput_model import StepTime, estimate_step

TP_DEGREES = (1, 2, 4, 8)  # tensor parallel stays inside a node
CP_DEGREES = (1, 2, 4, 8, 16, 32)
# context parallel shards of fewer tokens run flash attention and the ring on small chunks,
# which this model does not price: the planner does not go below
MIN_CP_TOKENS = 4096
AC_CHOICES = ("none", "selective", "full")  # selective: titan's op-level policy
# (schedule, stages per rank): looped schedules get layers_per_stage for that many, or the
# explicit split that gives that many where no layers_per_stage does (126 blocks in 64 stages)
PP_SCHEDULES = (
    ("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("Interleaved1F1B", 4), ("LoopedBFS", 2),
    ("InterleavedZeroBubble", 2), ("ZBVZeroBubble", 2), ("DualPipeV", 2),
)  # fmt: skip
# Blocks fewer on the first and on the last stage: 0, an even split; 1, the Llama 3 paper's, the
# embedding and the output (with the loss) each taking a block's place
LIGHTER_ENDS = (0, 1)


def _divisors(n: int, up_to: int) -> list[int]:
    return [d for d in range(1, min(n, up_to) + 1) if n % d == 0]


def _replicas(dp: int, tp: int, cp: int, node: int) -> list[int]:
    """dp_replicate choices: 1 (FSDP over every data-parallel rank), the one that keeps each
    shard group inside a node (HSDP), and dp (no sharding: DDP, or FSDP over cp alone)."""
    shard = node // (tp * cp)
    hsdp = [dp // shard] if 1 < shard < dp and dp % shard == 0 else []
    return sorted({1, dp, *hsdp})


def _splits(pp: int, args: ModelArgs) -> list[dict[str, Any]]:
    """The pipeline keys of each (schedule, stage split) choice for pp ranks, without two that
    give the same stages (126 blocks in 64 even stages already have the lighter ends)."""
    if pp == 1:
        return [{"pipeline_parallel_schedule": "1F1B"}]
    out, seen = [], set()
    for (name, per_rank), ends in itertools.product(PP_SCHEDULES, LIGHTER_ENDS):
        placement = SCHEDULES[name].placement
        n_stages = pp * {"single": 1, "v": 2}.get(placement, per_rank)
        keys = {"pipeline_parallel_schedule": name,
                "pipeline_parallel_first_stage_less_layers": ends,
                "pipeline_parallel_last_stage_less_layers": ends}  # fmt: skip
        try:  # titan's own weighted split
            names = split_module_names(args, Parallelism(**keys), n_stages)
        except ValueError:  # a stage without a block: left to titan's checks to refuse
            names = None
        if names is not None:
            if (name, str(names)) in seen:
                continue
            seen.add((name, str(names)))
        if placement == "loop":
            lps = math.ceil(args.n_layers / n_stages)
            if math.ceil(args.n_layers / lps) == n_stages or names is None:
                keys["pipeline_parallel_layers_per_stage"] = lps
            else:  # no layers_per_stage gives n_stages: the split written out
                stages = [" ".join(stage) for stage in names]
                keys = {"pipeline_parallel_schedule": name,
                        "pipeline_parallel_module_names_per_stage": stages}  # fmt: skip
        out.append(keys)
    return out


def _local_batches(per_dp: int, pp: int) -> list[int]:
    """Local batch sizes dividing each data-parallel rank's share of the global batch: up to 16
    sequences; pipelined, from pp micro-batches (fewer leave most stages idle) to 8 pp."""
    if pp == 1:
        return _divisors(per_dp, 16)
    sizes = _divisors(per_dp, 8 * pp)
    return [s for s in sizes if s >= pp] or sizes[-1:]


def _grad_reduces(dims: ParallelDims, schedule: str) -> tuple[str, ...]:
    """pipeline_parallel_grad_reduce's values for the layout: per micro-batch only where
    pipelined FSDP stages accumulate gradients and the schedule's backward is whole."""
    if dims.pp == 1 or dims.fsdp_degree == 1 or SCHEDULES[schedule].zero_bubble:
        return ("stage",)
    return ("stage", "microbatch")


def _cp_degrees(seq_len: int) -> list[int]:
    """Context parallel degrees that leave each rank at least MIN_CP_TOKENS of a sequence."""
    return [c for c in CP_DEGREES if c == 1 or seq_len // c >= MIN_CP_TOKENS]


def candidates(req: Request, fixed: dict[str, Any] | None = None) -> Iterator[Candidate]:
    """Every layout the planner tries (titan's checks then filter them). `fixed` pins any of
    tp, cp, pp, dp_replicate, schedule, local_batch_size, ac, float8, even to values the planner
    would not try (to ask titan why not)."""
    fixed = fixed or {}

    def pick(key: str, default) -> list:
        return [fixed[key]] if key in fixed else list(default)

    args, node = req.args, req.gpu.gpus_per_node
    f8s = {"on": (True,), "off": (False,), "auto": (False, True)}[req.float8]
    # titan refuses float8 where its filter converts no linear (all too small to gain)
    f8s = [f for f in f8s if not f or (req.gpu.float8 and float8_linears(args))]
    for tp, cp in itertools.product(pick("tp", TP_DEGREES), pick("cp", _cp_degrees(req.seq_len))):
        if req.gpus % (tp * cp):
            continue
        for pp in pick("pp", _divisors(req.gpus // (tp * cp), args.n_layers)):
            dp, rest = divmod(req.gpus, tp * cp * pp)
            if rest or req.global_batch % dp:
                continue
            for rep in (
                r for r in pick("dp_replicate", _replicas(dp, tp, cp, node)) if dp % r == 0
            ):
                for split in _splits(pp, args):
                    schedule = split["pipeline_parallel_schedule"]
                    if fixed.get("schedule", schedule) != schedule:
                        continue
                    par = Parallelism(
                        data_parallel_replicate_degree=rep, data_parallel_shard_degree=dp // rep,
                        tensor_parallel_degree=tp, pipeline_parallel_degree=pp,
                        context_parallel_degree=cp, **split,
                    )  # fmt: skip
                    dims = resolve_parallel_dims(par, req.gpus)  # the run's own degree check
                    lbs = pick("local_batch_size", _local_batches(req.global_batch // dp, pp))
                    inner = itertools.product(lbs, pick("ac", AC_CHOICES), pick("float8", f8s))
                    for size, ac, f8 in inner:
                        for reduce in _grad_reduces(dims, schedule):
                            p = dataclasses.replace(par, pipeline_parallel_grad_reduce=reduce)
                            yield Candidate(p, dims, size, ac, f8)


def memory_of(req: Request, cand: Candidate, compiled_loss: bool = True) -> MemoryEstimate | None:
    """The candidate's peak memory per rank (None where titan's split cannot place it), with
    the loss compiled as the planner's TOML sets it (compiled_loss=False: the eager loss, as a
    dry run traces it)."""
    accumulation = req.global_batch // (cand.dims.dp * cand.local_batch_size)
    try:
        return estimate_memory(
            req.args, cand.parallelism, cand.dims, req.seq_len, cand.local_batch_size, cand.ac_mode,
            cand.float8, compiled_loss=compiled_loss, grad_accumulation=accumulation,
        )  # fmt: skip
    except (ValueError, ZeroDivisionError):
        return None


def time_of(req: Request, cand: Candidate) -> tuple[StepTime, int]:
    """(step time, gradient accumulation steps) of an accepted candidate."""
    time = estimate_step(
        req.args, cand.parallelism, cand.dims, req.seq_len, cand.local_batch_size,
        req.global_batch, cand.ac_mode, cand.float8, req.gpu, cand.compile_blocks,
    )  # fmt: skip
    return time, req.global_batch // (cand.dims.dp * cand.local_batch_size)


def evaluate(req: Request, cand: Candidate) -> Plan | str:
    """One layout: titan's reason to refuse it, or that it does not fit, or its Plan."""
    accepted = accept(req, cand)
    if isinstance(accepted, str):
        return accepted
    memory = memory_of(req, accepted)
    if memory is None or memory.total > req.budget:
        need = "?" if memory is None else f"{memory.total / GIB + req.reserve_gib:.1f}"
        return f"needs {need} GiB per GPU with the reserve, over {req.memory_gib:g} GiB"
    time, accumulation = time_of(req, accepted)
    return Plan(accepted, memory, time, accumulation)


@dataclass
class Result:
    plans: list[Plan]  # accepted by titan and fitting, best (shortest step) first
    tried: int  # candidates estimated
    refused: int  # of those that fit, the ones titan refuses
    smallest: Plan | None = None  # nothing fits: the accepted layout that needs the least


def plan(req: Request) -> Result:
    """Rank the layouts titan accepts that fit `req.memory_gib`; when none does, find the one
    titan accepts that needs the least memory. Memory is estimated first (titan's checks only
    run on layouts that fit), local batches in increasing order (memory grows with them)."""
    fits, over, tried = [], [], 0
    unestimated = []  # over the budget by their state alone: estimated if nothing fits
    groups: dict[tuple, list[Candidate]] = {}
    for cand in candidates(req):
        # the layout (a Parallelism holds a list, unhashable): its degrees and pipeline split,
        # all that candidates() varies in it
        key = (cand.dims, pipeline_split(cand.parallelism), cand.ac_mode, cand.float8)
        groups.setdefault(key, []).append(cand)
    for group in groups.values():
        for cand in sorted(group, key=lambda c: c.local_batch_size):
            tried += 1
            if _state_over(req, cand):
                unestimated.append(cand)
                break
            memory = memory_of(req, cand)
            if memory is None:
                continue
            if memory.total > req.budget:
                over.append(Plan(cand, memory))
                break
            fits.append(Plan(cand, memory))
    plans, refused = [], 0
    for p in fits:
        accepted = accept(req, p.candidate)
        if isinstance(accepted, str):
            refused += 1
            continue
        p.candidate = accepted
        p.time, p.accumulation = time_of(req, accepted)
        plans.append(p)
    plans.sort(key=lambda p: (p.time.step, p.memory.total))
    result = Result(plans, tried, refused)
    if not plans:
        over += [Plan(c, m) for c in unestimated if (m := memory_of(req, c)) is not None]
        for p in sorted(over, key=lambda p: p.memory.total):
            accepted = accept(req, p.candidate)
            if not isinstance(accepted, str):
                result.smallest = dataclasses.replace(p, candidate=accepted)
                break
    return result


def _state_over(req: Request, cand: Candidate) -> bool:
    """Whether the candidate's fp32 weights and optimizer state alone exceed the budget (or
    titan's split cannot place it): no estimate needed."""
    try:
        return state_bytes(req.args, cand.parallelism, cand.dims) > req.budget
    except (ValueError, ZeroDivisionError):
        return True


def fits_anywhere(req: Request) -> bool:
    """Whether any layout titan accepts fits (stops at the first)."""
    for cand in candidates(req):
        if _state_over(req, cand):
            continue
        memory = memory_of(req, cand)
        if (
            memory is not None
            and memory.total <= req.budget
            and not isinstance(accept(req, cand), str)
        ):
            return True
    return False


def nothing_fits(req: Request, smallest: Plan | None) -> str:
    """One line: nothing fits, the smallest shortfall, and the GPU count or memory that fixes
    it."""
    if smallest is None:
        return f"nothing fits: titan accepts none of the layouts tried for {req.gpus} GPUs"
    need = smallest.memory.total / GIB + req.reserve_gib
    gpus = req.gpus
    for _ in range(12):  # more GPUs shard the state further
        gpus *= 2
        more = dataclasses.replace(req, gpus=gpus)
        if fits_anywhere(more):
            break
    else:
        gpus = 0
    fix = f"at least {gpus} {req.gpu.name} GPUs" if gpus else "more GPUs"
    return (
        f"nothing fits in {req.memory_gib:g} GiB per GPU: the smallest layout titan accepts "
        f"({describe(smallest.candidate)}) needs {need:.1f} GiB with {req.reserve_gib:g} GiB "
        f"kept for CUDA/NCCL ({smallest.memory.dominant.replace('_', ' ')} dominates), "
        f"{need - req.memory_gib:.1f} GiB short: use {fix}, or --memory-gib {math.ceil(need)}"
    )


def describe(cand: Candidate) -> str:
    """'dp_shard 8, tp 8, pp 8 Interleaved1F1B (lps 8), local batch 8, full AC, float8'."""
    d, p = cand.dims, cand.parallelism
    parts = [f"{n} {v}" for n, v in (("dp_replicate", d.dp_replicate),
             ("dp_shard", d.dp_shard), ("tp", d.tp), ("cp", d.cp)) if v > 1]  # fmt: skip
    if d.pp > 1:
        split = split_label(p)
        parts.append(f"pp {d.pp} {p.pipeline_parallel_schedule}" + (f" ({split})" if split else ""))
    parts += [f"local batch {cand.local_batch_size}", f"{cand.ac_mode} AC"]
    return ", ".join(parts + (["float8"] if cand.float8 else []))


def split_label(p: Parallelism) -> str:
    """The stage split in short: 'lps 4', 'lps 4 ends-1' (first and last stage a block
    lighter), '64 stages ends-1' (explicit), '' (even, one stage per rank or two); 'rs/mb':
    gradients reduce-scattered every micro-batch (pipeline_parallel_grad_reduce)."""
    names = p.pipeline_parallel_module_names_per_stage
    if names:
        blocks = [sum(n.startswith("layers.") for n in stage.split()) for stage in names]
        lighter = max(blocks) - max(blocks[0], blocks[-1])
        label = f"{len(names)} stages" + (f" ends-{lighter}" if lighter > 0 else "")
        return label + (" rs/mb" if p.pipeline_parallel_grad_reduce == "microbatch" else "")
    parts = ["rs/mb"] if p.pipeline_parallel_grad_reduce == "microbatch" else []
    if p.pipeline_parallel_layers_per_stage:
        parts.append(f"lps {p.pipeline_parallel_layers_per_stage}")
    first = p.pipeline_parallel_first_stage_less_layers
    last = p.pipeline_parallel_last_stage_less_layers
    if first or last:
        parts.append(f"ends-{first}" if first == last else f"ends-{first}/-{last}")
    return " ".join(parts)
