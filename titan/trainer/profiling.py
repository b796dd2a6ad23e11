"""Optional torch profiler traces and CUDA memory snapshots, each a context manager whose
yielded object the train loop steps once per train step (None when disabled)."""

import contextlib
import os
import pickle
import time
from collections.abc import Iterator

import torch

from titan.config.job_config import Profiling
from titan.logger import logger

# Allocator events kept for a snapshot: enough for many steps of a large model, bounded so
# that recording cannot grow host memory without limit.
_MAX_MEMORY_EVENTS = 100_000


def _validate(cfg: Profiling) -> None:
    if cfg.profile_freq < 1:
        raise ValueError(f"profiling.profile_freq must be >= 1, got {cfg.profile_freq}")
    if cfg.profiler_active < 1:
        raise ValueError(f"profiling.profiler_active must be >= 1, got {cfg.profiler_active}")
    if cfg.profiler_warmup < 0:
        raise ValueError(f"profiling.profiler_warmup must be >= 0, got {cfg.profiler_warmup}")
    if cfg.profile_freq <= cfg.profiler_warmup + cfg.profiler_active:
        raise ValueError(
            f"profiling.profile_freq ({cfg.profile_freq}) must exceed profiler_warmup "
            f"({cfg.profiler_warmup}) + profiler_active ({cfg.profiler_active}): each window of "
            "profile_freq steps waits, warms up, then records"
        )


@contextlib.contextmanager
def maybe_enable_profiling(
    cfg: Profiling, dump_folder: str, *, rank: int, global_step: int = 0
) -> Iterator[torch.profiler.profile | None]:
    """Yield a torch profiler recording the last profiler_active of every profile_freq steps
    (after profiler_warmup warm-up steps), or None when disabled. `global_step` is the step
    already done (on resume) so windows stay aligned to absolute steps."""
    if not cfg.enable_profiling:
        yield None
        return
    _validate(cfg)
    trace_dir = os.path.join(dump_folder, cfg.save_traces_folder)
    wait = cfg.profile_freq - cfg.profiler_warmup - cfg.profiler_active
    base = torch.profiler.schedule(
        wait=wait, warmup=cfg.profiler_warmup, active=cfg.profiler_active
    )

    def schedule(step_num: int) -> torch.profiler.ProfilerAction:
        return base(step_num + global_step)

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        # prof.step_num counts .step() calls, so after train step s (1-based) it is s.
        folder = os.path.join(trace_dir, f"iteration_{prof.step_num + global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{rank}_trace.json")
        begin = time.perf_counter()
        prof.export_chrome_trace(path)
        logger.info(f"Profiler trace written to {path} in {time.perf_counter() - begin:.2f}s")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    logger.info(f"Profiling every {cfg.profile_freq} steps; traces go to {trace_dir}")
    with torch.profiler.profile(
        activities=activities,
        schedule=schedule,
        on_trace_ready=on_trace_ready,
        record_shapes=True,
    ) as prof:
        yield prof


class MemorySnapshotter:
    """Dumps the CUDA allocator's recorded history every profile_freq steps; step() once per
    train step. Open it with maybe_enable_memory_snapshot, which starts and stops recording."""

    def __init__(self, folder: str, rank: int, freq: int, global_step: int = 0) -> None:
        self.folder = folder
        self.rank = rank
        self.freq = freq
        self.step_num = global_step

    def step(self) -> None:
        """Mark the end of a train step; dump a snapshot when it is a multiple of the frequency."""
        self.step_num += 1
        if self.step_num % self.freq == 0:
            self.dump(f"iteration_{self.step_num}")

    def dump(self, subfolder: str) -> str:
        """Write the current snapshot to folder/subfolder/rank<r>_memory_snapshot.pickle."""
        out_dir = os.path.join(self.folder, subfolder)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"rank{self.rank}_memory_snapshot.pickle")
        begin = time.perf_counter()
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info(f"Memory snapshot written to {path} in {time.perf_counter() - begin:.2f}s")
        return path


@contextlib.contextmanager
def maybe_enable_memory_snapshot(
    cfg: Profiling, dump_folder: str, *, rank: int, global_step: int = 0
) -> Iterator[MemorySnapshotter | None]:
    """Record CUDA allocator history and yield a MemorySnapshotter, or None when disabled or
    not on CUDA. An out-of-memory error inside the block dumps a snapshot before it propagates,
    since that is when one is most wanted."""
    if not cfg.enable_memory_snapshot:
        yield None
        return
    if cfg.profile_freq < 1:
        raise ValueError(f"profiling.profile_freq must be >= 1, got {cfg.profile_freq}")
    if not torch.cuda.is_available():
        logger.warning("profiling.enable_memory_snapshot needs CUDA; no memory snapshots taken")
        yield None
        return
    folder = os.path.join(dump_folder, cfg.save_memory_snapshot_folder)
    snapshotter = MemorySnapshotter(folder, rank, cfg.profile_freq, global_step)
    torch.cuda.memory._record_memory_history(max_entries=_MAX_MEMORY_EVENTS)
    logger.info(f"Recording CUDA memory history; snapshots go to {folder}")
    try:
        yield snapshotter
    except torch.OutOfMemoryError:
        snapshotter.dump(f"iteration_{snapshotter.step_num + 1}_oom")
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
