"""A pipeline rank's memory through its step: torch's order of forward and backward actions on
the rank (or a plain step's micro-batches), reduced to the points where memory can peak, and the
bytes at each point from per-stage terms (StageBytes)."""

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

NONE, ACCUMULATING, SYNCED = 0, 1, 2  # a stage's gradients: none yet, between syncs, synced
COMPUTE = ("F", "B", "I", "W")  # forward, backward, its input- and weight-gradient halves
PARTS = (
    "parameters", "gradients", "optimizer_state", "activations", "backward_temporaries",
    "gathered_parameters", "communication_buffers", "buffers",
)  # fmt: skip


@dataclass
class StageBytes:
    """One stage's memory terms on its rank, in bytes. The transients (part -> bytes) exist
    only while a backward of the stage runs."""

    micro_batch: float  # activations one micro-batch in flight keeps until its backward
    persistent: float = 0.0  # held all step (the pipeline's receive buffers)
    gathered: float = 0.0  # weights gathered from the first forward to the last backward
    accumulating: float = 0.0  # gradients between the stage's first and last backward
    synced: float = 0.0  # gradients after its last backward (FSDP: reduce-scattered)
    at_start: dict[str, float] = field(default_factory=dict)  # the loss's backward
    in_block: dict[str, float] = field(default_factory=dict)  # one block's backward
    at_end: dict[str, float] = field(default_factory=dict)  # the embedding's weight gradient

    @functools.cached_property
    def transient(self) -> dict[str, float]:
        """Total transient bytes at the start and at the end of a backward of the stage."""
        block = sum(self.in_block.values())
        return {
            "start": max(sum(self.at_start.values()), block),
            "end": max(sum(self.at_end.values()), block),
        }


@dataclass(frozen=True)
class Point:
    """A moment of a rank's step: micro-batches in flight, gradient state and gathered weights
    per stage, and the stage whose backward starts ("start") or ends ("end") there."""

    held: tuple[int, ...]
    grads: tuple[int, ...]
    gathered: tuple[bool, ...]
    stage: int
    moment: str


def _single_stage_actions(schedule: str, n_micro: int, warmup: int) -> list[tuple[str, int]]:
    """(kind, micro-batch) of GPipe (all forwards, then all backwards) or 1F1B (`warmup`
    forwards, then a backward and a forward in turn), as torch's single-stage schedules run."""
    if schedule == "GPipe":
        return [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]
    warmup = min(n_micro, warmup)
    out = [("F", m) for m in range(warmup)]
    for m in range(n_micro):
        out.append(("B", m))
        if warmup + m < n_micro:
            out.append(("F", warmup + m))
    return out


def rank_actions(
    schedule: str, pp: int, rank: int, n_micro: int, stages: tuple[int, ...], csv: str = ""
) -> list[tuple[str, int, int]]:
    """(kind F/B/I/W, local stage, micro-batch) of the rank's compute actions in torch's order,
    or in the order of its row of the CSV schedule `csv`. pp 1: a plain step's
    gradient-accumulation micro-batches (forward, backward, ...)."""
    if pp == 1:
        return [(k, 0, m) for m in range(n_micro) for k in ("F", "B")]
    local = {s: i for i, s in enumerate(stages)}
    if csv:
        return [(kind, local[s], m) for kind, s, m in _csv_actions(csv)[rank]]
    if schedule in ("GPipe", "1F1B"):
        return [(k, 0, m) for k, m in _single_stage_actions(schedule, n_micro, pp - rank)]
    from torch.distributed.pipelining.schedules import get_schedule_class

    rounds = max(1, n_micro // pp)
    # the attributes torch's _calculate_single_rank_operations reads, without building stages
    state = SimpleNamespace(
        pp_group_size=pp, _n_microbatches=n_micro, n_local_stages=len(stages),
        num_stages=pp * len(stages), number_of_rounds=rounds,
        microbatches_per_round=n_micro // rounds, _stages=[None] * len(stages), rank=rank,
    )  # fmt: skip
    ops = get_schedule_class(schedule)._calculate_single_rank_operations(state, rank)
    out = []
    for op in (op for op in ops if op is not None):  # None: a bubble
        for a in op.sub_actions or (op,):  # DualPipeV's overlapped forward and backward
            out.append((a.computation_type.value, local[a.stage_index], a.microbatch_index))
    return out


@functools.lru_cache(maxsize=64)
def _csv_actions(path: str) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """Per row (pipeline rank) of a CSV schedule, its compute actions (kind, stage, micro-batch)
    in order; communication and FSDP actions left out."""
    import csv

    from torch.distributed.pipelining.schedules import _Action

    with open(path, newline="") as f:
        rows = [[a for a in map(_Action.from_str, row) if a is not None] for row in csv.reader(f)]
    out = []
    for row in rows:
        subs = [sub for a in row for sub in a.sub_actions or (a,)]  # overlapped F and B
        out.append(tuple((a.computation_type.value, a.stage_index, a.microbatch_index)
                         for a in subs if a.computation_type.value in COMPUTE))  # fmt: skip
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def peak_points(
    schedule: str,
    pp: int,
    rank: int,
    n_micro: int,
    stages: tuple[int, ...],
    csv: str = "",
    sync_every: bool = False,
) -> tuple[Point, ...]:
    """The points of the rank's step where memory can peak: the start and the end of every
    backward (B, or I then W for zero-bubble schedules), deduplicated and without the points
    another point holds at least as much as. A stage's weights are gathered from its first
    forward to its last backward; its gradients accumulate from its first backward and are
    synced (reduce-scattered) at its last, its n_micro-th (pp 1 or `sync_every`: at every
    backward)."""
    n = len(stages)
    held, grads, gathered = [0] * n, [NONE] * n, [pp == 1] * n
    done = [0] * n
    points: dict[Point, None] = {}  # in the order of the step (a set's order varies by process)

    def mark(stage: int, moment: str) -> None:
        points.setdefault(Point(tuple(held), tuple(grads), tuple(gathered), stage, moment))

    for kind, s, _ in rank_actions(schedule, pp, rank, n_micro, stages, csv):
        if kind == "F":
            held[s] += 1
            gathered[s] = True
            continue
        if kind in ("B", "I"):
            mark(s, "start")
        if kind in ("B", "W"):
            held[s] -= 1
            done[s] += 1
            last = pp == 1 or done[s] == n_micro
            grads[s] = SYNCED if last or sync_every else ACCUMULATING
            mark(s, "end")
            if last and pp > 1:
                gathered[s] = False  # FSDP reshards after the last backward
    return _undominated(points)


def _undominated(points: dict[Point, None]) -> tuple[Point, ...]:
    """The points that no other point of the same stage and moment holds at least as much as:
    as many micro-batches in flight, gradients as large (none < synced < accumulating: the
    sharded gradients are smaller than the unsharded ones) and weights gathered, everywhere.
    In the step's order, so that of equal peaks the first is reported, in every process."""
    grade = {NONE: 0, SYNCED: 1, ACCUMULATING: 2}
    order = {p: i for i, p in enumerate(points)}
    groups: dict[tuple, list[tuple[tuple[int, ...], Point]]] = {}
    for p in points:
        vector = (*p.held, *(grade[g] for g in p.grads), *p.gathered)
        groups.setdefault((p.stage, p.moment), []).append((vector, p))
    out = []
    for members in groups.values():
        members.sort(key=lambda m: (-sum(m[0]), order[m[1]]))
        kept: list[tuple[tuple[int, ...], Point]] = []
        for vector, p in members:
            if not any(all(a >= b for a, b in zip(k, vector, strict=True)) for k, _ in kept):
                kept.append((vector, p))
        out += [p for _, p in kept]
    return tuple(sorted(out, key=order.__getitem__))


def point_total(p: Point, stages: list[StageBytes], prior_synced: bool) -> float:
    """sum(point_parts(...).values()), without building the parts."""
    total = 0.0
    for held, grads, gathered, st in zip(p.held, p.grads, p.gathered, stages, strict=True):
        total += held * st.micro_batch + st.persistent + (st.gathered if gathered else 0.0)
        if grads == ACCUMULATING:
            total += st.accumulating + (st.synced if prior_synced else 0.0)
        elif grads == SYNCED or prior_synced:
            total += st.synced
    return total + stages[p.stage].transient[p.moment]


def point_parts(p: Point, stages: list[StageBytes], prior_synced: bool) -> dict[str, float]:
    """Bytes by part at point p (static state left out). prior_synced: an earlier micro-batch
    step of gradient accumulation left every stage's synced gradients."""
    parts = dict.fromkeys(PARTS, 0.0)
    for s, st in enumerate(stages):
        parts["activations"] += p.held[s] * st.micro_batch
        parts["communication_buffers"] += st.persistent
        parts["gathered_parameters"] += st.gathered if p.gathered[s] else 0.0
        grads = {NONE: 0.0, ACCUMULATING: st.accumulating, SYNCED: st.synced}[p.grads[s]]
        if prior_synced and p.grads[s] != SYNCED:
            grads += st.synced
        parts["gradients"] += grads
    st = stages[p.stage]
    edge = st.at_start if p.moment == "start" else st.at_end
    transient = max(edge, st.in_block, key=lambda t: sum(t.values()))
    for part, n in transient.items():
        parts[part] += n
    return parts
