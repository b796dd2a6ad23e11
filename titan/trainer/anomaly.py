"""What a step with a non-finite or spiking loss or gradient norm does ([resilience]).

Detect: a non-finite loss or grad norm; with spike_sigma, a loss more than that many standard
deviations above the mean of the last spike_window accepted steps; with grad_norm_spike_factor,
a grad norm above that factor times their mean norm. The tests run on the host values the step
reads anyway (the loss and the global norm), so a clean step costs nothing more.

Replay: titan's steps are deterministic (the same weights, data and random state give the same
gradients), so the step is run again from the same state before anything is decided. Each rank
compares the sum of squares of its own gradient pieces between the two runs: a different result
is a transient fault (a flipped bit, a bad kernel launch), and the ranks whose gradients
differed are named. If the replay is clean, training goes on with it, and the run continues on
exactly the losses it would have had. If the replay is as bad, it is the data or the numerics,
and `on_anomaly` decides: 'stop' (raise), 'skip' (no update; the LR schedule and the data move
on), or 'rollback': reload the newest checkpoint and skip the next rollback_skip_batches global
batches after it (PaLM's remedy for spikes). Skipped windows are recorded in
<checkpoint folder>/skipped_batches.json, so that any run that later passes that checkpoint's
step (a resume from it, or from an older one) skips the same batches.

Every decision is logged with the step, the loss, the grad norm and the action.
"""

import json
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from titan.checkpoint.checkpointer import CheckpointManager, complete_steps
from titan.config.job_config import Resilience
from titan.errors import AnomalyError, NonFiniteLossError
from titan.logger import logger

SKIPS_FILE = "skipped_batches.json"
MAX_ROLLBACKS = 3  # to one checkpoint: an anomaly that outlives this many skips is not the data
_SAME = 1e-5  # relative difference of a rank's gradient sum of squares that counts as the same


@dataclass
class Verdict:
    loss: float
    grad_norm: float
    action: str  # "apply" (the step, or its clean replay), "skip" or "rollback"


class AnomalyGuard:
    """Tests each step's (loss, grad norm) and decides what an anomalous step does."""

    def __init__(self, cfg: Resilience, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.history: deque[tuple[float, float]] = deque(maxlen=cfg.spike_window)
        self.rollbacks: dict[int, int] = {}  # checkpoint step: rollbacks to it in this process

    def state_dict(self) -> dict[str, Any]:
        """The spike tests' history, saved in checkpoints so a resumed run tests alike."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(tuple(x) for x in state["history"])

    def anomaly(self, loss: float, grad_norm: float) -> str | None:
        """Why the step is anomalous, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "non-finite"
        if len(self.history) < self.cfg.spike_window:
            return None
        losses, norms = zip(*self.history, strict=True)
        sigma, factor = self.cfg.spike_sigma, self.cfg.grad_norm_spike_factor
        if sigma:  # off by default: no statistics are computed for a test that is off
            mean, std = statistics.fmean(losses), statistics.pstdev(losses)
            if loss > mean + sigma * std:
                return (f"loss spike ({loss:.6f} > mean {mean:.6f} + {sigma:g} x std {std:.6f} "
                        f"of the last {len(losses)} steps)")  # fmt: skip
        if factor:
            mean_norm = statistics.fmean(norms)
            if grad_norm > factor * mean_norm:
                return (f"grad norm spike ({grad_norm:.4g} > {factor:g} x mean {mean_norm:.4g} "
                        f"of the last {len(norms)} steps)")  # fmt: skip
        return None

    def check(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        replay: Callable[[], tuple[float, float]] | None,
        fingerprint: Callable[[], float],
    ) -> Verdict:
        """The step's verdict. `replay` runs the step again from the same state and returns its
        (loss, grad norm), or is None where it cannot (a step driven from outside train_step);
        `fingerprint` is this rank's gradient sum of squares."""
        why = self.anomaly(loss, grad_norm)
        if why is None:
            self.history.append((loss, grad_norm))
            return Verdict(loss, grad_norm, "apply")
        first = f"loss {loss:.6f}, grad norm {grad_norm:.4g}"
        if self.cfg.replay and replay is not None:
            logger.warning(f"step {step}: {why} ({first}); replaying the step")
            before = fingerprint()
            loss2, norm2 = replay()
            ranks = self._ranks_differing(before, fingerprint())
            why2 = self.anomaly(loss2, norm2)
            if why2 is None:
                self.history.append((loss2, norm2))
                logger.warning(
                    f"step {step}: transient fault: the replay gave loss {loss2:.6f}, grad norm "
                    f"{norm2:.4g} (first run: {first}); gradients differed on rank(s) "
                    f"{ranks or 'none'}; action: apply the replayed step"
                )
                return Verdict(loss2, norm2, "apply")
            same = "the same result" if not ranks else f"{why2} again (ranks {ranks} differed)"
            why = f"{why}; a replay gave {same}: the data or the numerics, not a transient fault"
            loss, grad_norm = loss2, norm2
        return self._policy(step, why, loss, grad_norm)

    def _policy(self, step: int, why: str, loss: float, grad_norm: float) -> Verdict:
        action = self.cfg.on_anomaly
        what = f"step {step}: loss {loss}, grad norm {grad_norm}"
        if action == "stop":
            error = NonFiniteLossError if why.startswith("non-finite") else AnomalyError
            raise error(
                f"{what}; the update was not applied ({why}). Lower optimizer.lr, raise "
                "lr_scheduler.warmup_steps, check the data, or set resilience.on_anomaly to "
                "'skip' or 'rollback'"
            )
        logger.warning(f"{what}: {why}; action: {action} (resilience.on_anomaly)")
        return Verdict(loss, grad_norm, action)

    def _ranks_differing(self, before: float, after: float) -> list[int]:
        """The ranks whose gradients differ between the run and its replay (all ranks agree)."""
        differs = not _same(before, after)
        if not dist.is_initialized():
            return [0] if differs else []
        flags = torch.zeros(dist.get_world_size(), device=self.device)
        flags[dist.get_rank()] = float(differs)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]


def _same(a: float, b: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.isnan(a) == math.isnan(b) and (math.isnan(a) or a == b)
    return abs(a - b) <= _SAME * max(abs(a), abs(b))


def recorded_skips(folder: Path, step: int) -> int:
    """Global batches to skip once step `step` is done (or loaded), as earlier rollbacks wrote."""
    path = folder / SKIPS_FILE
    if not path.exists():
        return 0
    return sum(e["batches"] for e in json.loads(path.read_text()) if e["after_step"] == step)


def record_skip(folder: Path, after_step: int, batches: int, at_step: int, why: str) -> None:
    """Append a rollback's window to the checkpoint folder's record (rank 0 writes it)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = folder / SKIPS_FILE
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append({"after_step": after_step, "batches": batches, "at_step": at_step, "why": why})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    tmp.rename(path)  # atomic: a crash leaves the old record or the new one


def rollback(ckpt: CheckpointManager, guard: AnomalyGuard, at_step: int, batches: int) -> int:
    """Reload the newest checkpoint (weights, optimizer, data position, the guard's history)
    and record the `batches` global batches after it as skipped; returns its step."""
    if not complete_steps(ckpt.folder):
        raise AnomalyError(
            f"step {at_step}: resilience.on_anomaly = 'rollback' but no checkpoint was saved yet "
            f"(checkpoint.interval = {ckpt.cfg.interval}): lower the interval, or choose 'skip'"
        )
    step = ckpt.load_newest()
    guard.rollbacks[step] = guard.rollbacks.get(step, 0) + 1
    if guard.rollbacks[step] > MAX_ROLLBACKS:
        raise AnomalyError(
            f"step {at_step}: rolled back to step {step} {MAX_ROLLBACKS} times and the anomaly "
            "came back each time, so it is not the data: lower optimizer.lr, or resume from "
            "an older checkpoint (checkpoint.load_step)"
        )
    record_skip(ckpt.folder, step, batches, at_step, f"anomaly at step {at_step}")
    if dist.is_initialized():
        dist.barrier()  # every rank reads the record rank 0 wrote
    logger.warning(
        f"step {at_step}: rolled back to the checkpoint of step {step}; the next {batches} "
        f"global batches after it are skipped (recorded in {ckpt.folder / SKIPS_FILE})"
    )
    return step


def skip_recorded(ckpt: CheckpointManager, dataloader: Any, data_iter: Any, step: int) -> None:
    """Skip the global batches that rollbacks recorded after `step` (now done or loaded)."""
    n = recorded_skips(ckpt.folder, step)
    if n:
        skip_batches(dataloader, data_iter, n)
        logger.info(f"data: skipped {n} global batches after step {step} ({SKIPS_FILE})")


def skip_batches(dataloader: Any, data_iter: Any, steps: int) -> None:
    """Move the data `steps` global batches on: by position where the loader is indexed by
    window, else by reading and dropping the micro-batches (a stream)."""
    if hasattr(dataloader, "skip"):
        dataloader.skip(steps)
        return
    for _ in range(steps * dataloader.accumulation):
        next(data_iter)


def rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU and current CUDA device's random state (a few kB copied on the host)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
