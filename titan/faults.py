"""Faults made on purpose, for the tests of titan's resilience: off unless the environment
variable TITAN_FAULT_INJECTION names some. Never set it in a real run.

TITAN_FAULT_INJECTION is a comma-separated list of `kind@where[=value]`, `where` being
`step` (every rank), `step/rank`, or `*/rank` (every step of that rank):
  raise@3/1          rank 1 raises RuntimeError in step 3
  config_error@0/1   rank 1 rejects the config at start-up (step 0)
  corrupt_grad@3/1   rank 1 scales its gradients by 1e4 in step 3, once per process
  poison_window@40   a step that reads global window 40 gives a NaN loss (=10: 10x the loss)
  sleep@3/1=60       rank 1 sleeps 60 s inside step 3 (a hang)
  sleep@*/1=0.2      rank 1 sleeps 0.2 s in every step (a straggler)
Each kind is read where titan acts on it; `fault(kind, step, rank)` says whether (and with what
value) it is due there. `sleep` fires only in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT
unset or 0): a group restarted after the hang resumes and must not hang again at that step."""

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ENV = "TITAN_FAULT_INJECTION"
KINDS = ("raise", "config_error", "corrupt_grad", "poison_window", "sleep")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None  # None: every step
    rank: int | None  # None: every rank
    value: float | None


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            kind, rest = item.split("@", 1)
            where, _, value = rest.partition("=")
            step, _, rank = where.partition("/")
            assert kind in KINDS
            faults.append(
                Fault(
                    kind,
                    None if step == "*" else int(step),
                    int(rank) if rank else None,
                    float(value) if value else None,
                )
            )
        except (ValueError, AssertionError):
            raise ValueError(
                f"{ENV}: {item!r} is not kind@step[/rank][=value] with kind one of "
                f"{', '.join(KINDS)}"
            ) from None
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))
_FIRED: set[Fault] = set()


def active() -> bool:
    return bool(_FAULTS)


def fault(kind: str, step: int, rank: int, once: bool = False) -> Fault | None:
    """The fault of `kind` due at this step on this rank, or None. once: it fires a single time
    in this process (a transient fault)."""
    for f in _FAULTS:
        if f.kind != kind or (f.step is not None and f.step != step):
            continue
        if f.rank is not None and f.rank != rank:
            continue
        if once and f in _FIRED:
            continue
        if f.kind == "sleep" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            continue
        _FIRED.add(f)
        return f
    return None


def configure(spec: str) -> None:
    """Replace the faults (tests that train in their own process set them here)."""
    global _FAULTS
    _FAULTS = parse(spec)
    _FIRED.clear()


def corrupt_grads(params: Iterable[torch.nn.Parameter], step: int, rank: int) -> None:
    """corrupt_grad: once per process, multiply this rank's gradient pieces by the fault's value
    (default 1e4; nan poisons them), as a transient hardware fault would."""
    f = fault("corrupt_grad", step, rank, once=True) if _FAULTS else None
    if f is None:
        return
    factor = 1e4 if f.value is None else f.value
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                grad.mul_(factor)


def poison(first: int | None, end: int | None) -> float | None:
    """poison_window: the factor on the loss of a step that read the global windows
    [first, end) (NaN unless the fault gives one), or None (None: not read by window index)."""
    if not _FAULTS or first is None or end is None:
        return None
    for f in _FAULTS:
        if f.kind == "poison_window" and f.step is not None and first <= f.step < end:
            return float("nan") if f.value is None else f.value
    return None
