"""The trainer's step monitor: the phases of each step (data, forward-backward, optimizer,
validation, checkpoint) feed the hang watchdog (titan.trainer.watchdog) and the straggler
report, which every resilience.straggler_report_freq steps names the slowest ranks' step and
data-loading times against the median.

What the step time measures: in lockstep training every rank's wall step time is the same (the
fast ranks wait for the slow one inside a collective), so it cannot name a straggler. A rank's
step time here is from the end of its data loading to its arrival at the step-end reduction
(the gradient norm's all-reduce in clipping): the slowest rank arrives last and the others wait
inside that all-reduce, where it is not counted. Work after the last per-layer collective (with
FSDP, the backward's last reduce-scatter) and anything a rank does alone (host stalls, a slow
loss, the sleep fault) shows; a device slow through every layer is partly hidden, because
FSDP's collectives align the ranks layer by layer. Data-loading time is each rank's own. The
first step after a start or resume (compile, warm-up: uneven across ranks) is left out."""

import statistics
import time

import torch
import torch.distributed as dist

from titan.config.job_config import Resilience
from titan.logger import logger
from titan.trainer.watchdog import Watchdog

FLAG_RATIO = 1.2  # a rank this many times the median (step or data time) is flagged
FLAG_MIN_S = 0.005  # ... when also this much above it: microsecond noise is not a straggler
MAX_NAMED = 4  # ranks named per report: the slowest, then flagged ones


def straggler_report(first: int, last: int, times: list[tuple[float, float]]) -> str:
    """One line over steps first..last from every rank's (mean step s, mean data s): the
    slowest rank by step time always, then the others flagged on either, slowest first."""
    step_med = statistics.median(s for s, _ in times)
    data_med = statistics.median(d for _, d in times)

    def ratio(x: float, med: float) -> float:
        return x / med if med > 0 else (float("inf") if x > 0 else 1.0)

    def flagged(x: float, med: float) -> bool:
        return ratio(x, med) > FLAG_RATIO and x - med > FLAG_MIN_S

    order = sorted(range(len(times)), key=lambda r: -times[r][0])
    named = [order[0]] + [
        r for r in order[1:] if flagged(times[r][0], step_med) or flagged(times[r][1], data_med)
    ]
    parts = []
    for r in named[:MAX_NAMED]:
        s, d = times[r]
        slow = flagged(s, step_med) or flagged(d, data_med)
        parts.append(
            f"rank {r} step {s:.3f} s ({ratio(s, step_med):.2f}x median), data {d:.3f} s "
            f"({ratio(d, data_med):.1f}x)" + (" SLOW" if slow else "")
        )
    steps = f"step {last}" if first == last else f"steps {first}-{last}"
    return (
        f"stragglers {steps} (median step {step_med:.3f} s, data {data_med:.3f} "
        f"s over {len(times)} ranks): " + "; ".join(parts)
    )


class StepMonitor:
    """enter(step, phase) at each phase boundary; step_done(step) after each step (every rank:
    the straggler report is a collective); close() at the end. Off in a dry run."""

    def __init__(
        self, cfg: Resilience, dump_folder: str, rank: int, device: torch.device, first_step: int,
        enabled: bool = True,
    ):  # fmt: skip
        self.rank, self.device, self.first_step = rank, device, first_step
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.freq = cfg.straggler_report_freq if enabled and world > 1 else 0
        self.watchdog = None
        if enabled and cfg.watchdog_timeout_s > 0:
            self.watchdog = Watchdog(cfg.watchdog_timeout_s, rank, dump_folder, first_step)
        self._start = {}  # phase -> when this step entered it
        self._step_s, self._data_s, self._steps = 0.0, 0.0, 0

    def enter(self, step: int, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step, phase)
        if not self.freq:
            return
        if phase == "optimizer" and self.device.type == "cuda":
            torch.cuda.synchronize()  # arrival means this rank's kernels are done
        now = time.perf_counter()
        self._start[phase] = now
        if step == self.first_step:
            return
        if phase == "forward-backward" and "data" in self._start:
            self._data_s += now - self._start["data"]
        elif phase == "optimizer" and "forward-backward" in self._start:
            self._step_s += now - self._start["forward-backward"]
            self._steps += 1

    def step_done(self, step: int) -> None:
        if not self.freq or step % self.freq or not self._steps:
            return
        n = self._steps
        mine = torch.tensor([self._step_s / n, self._data_s / n], device=self.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)  # one small collective on the default group
        if self.rank == 0:
            logger.info(straggler_report(step - n + 1, step, [tuple(t.tolist()) for t in every]))
        self._step_s, self._data_s, self._steps = 0.0, 0.0, 0

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()

    def __enter__(self) -> "StepMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # an exception too: a watchdog left running would end the process later
