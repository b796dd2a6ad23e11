"""The hang watchdog: a daemon thread per rank that, when the rank makes no progress for
resilience.watchdog_timeout_s, writes every thread's stack and the collectives in flight to the
log and to <dump_folder>/watchdog/rank<N>.txt, then exits with status 1 so that torchrun's
MAX_RESTARTS restarts the group. Without it a rank stuck in a collective or in I/O holds every
other rank until the backend's own timeout, and nothing says which rank or where."""

import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path

from titan.elastic_errors import write_error_file
from titan.logger import logger

# The first step after a start or a resume compiles, warms allocators and caches and may save
# the first checkpoint: its phases get this many timeouts. Later phases get one.
FIRST_STEP_FACTOR = 3.0


def thread_stacks() -> str:
    """Every Python thread's stack, innermost call last, each headed by the thread's name. A
    thread blocked in C (a collective's wait, a read) shows the Python line that called it."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(parts)


def flight_records() -> list[dict]:
    """The entries of torch's flight recorders: the generic one (gloo) and, in CUDA builds,
    ProcessGroupNCCL's own (`_dump_nccl_trace`, read by name: CPU builds lack it)."""
    from torch._C import _distributed_c10d as c10d

    entries = []
    for dump in (getattr(c10d, "_dump_nccl_trace", None), getattr(c10d, "_dump_fr_trace", None)):
        if dump is not None:  # (collectives, no stack traces, not only the active ones)
            entries += pickle.loads(dump(True, False, False)).get("entries", [])
    return entries


def collectives_in_flight() -> str:
    """The collectives this rank has issued and not finished, from torch's flight recorders
    (on when TORCH_FR_BUFFER_SIZE > 0, which run_train.sh sets): op, process group, sequence
    number, sizes and age. Else the last one finished."""
    if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) <= 0:
        return "collectives: unknown (the flight recorder is off: set TORCH_FR_BUFFER_SIZE)"
    try:
        entries = flight_records()
    except Exception as e:  # a dump must not stop the report
        return f"collectives: the flight recorder could not be read ({e!r})"
    if not entries:
        return "collectives: none issued yet"
    active = [e for e in entries if not e.get("retired")]
    now = time.time_ns()

    def describe(e: dict) -> str:
        age = (now - e.get("time_created_ns", now)) / 1e9
        return (
            f"{e.get('profiling_name')} on group {e.get('process_group')} seq "
            f"{e.get('collective_seq_id')}, inputs {e.get('input_sizes')}, state "
            f"{e.get('state')}, issued {age:.1f} s ago"
        )

    if not active:
        return "collectives: none in flight; the last finished: " + describe(entries[-1])
    return "collectives in flight:\n" + "\n".join("  " + describe(e) for e in active)


class Watchdog:
    """beat(step, phase) marks progress (the rank enters a phase of a step: data,
    forward-backward, optimizer, validation, checkpoint); if the next beat does not come within
    the phase's allowance the thread reports and ends the process. Each phase is timed on its
    own, so a long validation or checkpoint save counts as progress at its end and a hung one
    is caught like a hung step."""

    def __init__(self, timeout_s: float, rank: int, dump_folder: str, first_step: int = 1):
        self.timeout_s, self.rank, self.first_step = timeout_s, rank, first_step
        self.path = Path(dump_folder) / "watchdog" / f"rank{rank}.txt"
        self.step, self.phase, self.since = first_step, "start", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="titan-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        # three plain stores: the thread reads them without a lock (a torn read delays it a poll)
        self.step, self.phase, self.since = step, phase, time.monotonic()

    def allowance(self) -> float:
        first = self.step <= self.first_step
        return self.timeout_s * (FIRST_STEP_FACTOR if first else 1.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            stalled = time.monotonic() - self.since
            if stalled > self.allowance():
                self._fire(stalled)

    def _fire(self, stalled: float) -> None:
        report = (
            f"watchdog: rank {self.rank} made no progress for {stalled:.1f} s in step "
            f"{self.step}, phase {self.phase} (allowed {self.allowance():g} s): exiting with "
            f"status 1\n{collectives_in_flight()}\nevery thread's stack, innermost call last:\n"
            f"{thread_stacks()}"
        )
        try:  # the file first: torchrun ends the other ranks as soon as one exits
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(report)
        except OSError as e:
            report += f"\n(could not write {self.path}: {e})"
        logger.error(report + f"\nwatchdog: this report is also in {self.path}")
        write_error_file(report.partition("\n")[0] + f" (stacks in {self.path})")  # the summary
        for handler in logger.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the main thread is stuck: no exception can reach it
