"""The hang watchdog and the straggler report: a watchdog in a subprocess fires on a stuck
thread and stays quiet while beaten; the report names the slow rank; from run_train.sh a rank
made slow is named, and (heavy) a rank made to hang is reported, its group restarted and resumed
with the uninterrupted run's losses."""

import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_launch import ROOT, _env, _free_port, _losses, _start, _stop, _train

from titan import faults
from titan.config.job_config import Resilience
from titan.trainer.monitor import StepMonitor, straggler_report
from titan.trainer.watchdog import FIRST_STEP_FACTOR, Watchdog

STUCK = """
import sys, time
from titan.logger import init_logger
from titan.trainer.watchdog import Watchdog

init_logger()
dog = Watchdog({timeout}, rank=3, dump_folder=sys.argv[1])
for i in range(12):  # 2.4 s of beats: twice the timeout, and no report
    time.sleep(0.2)
    dog.beat(2, "data")
print("beats done", time.monotonic(), flush=True)


def stuck_in_io():
    time.sleep(30)


stuck_in_io()
"""


def test_watchdog_fires_on_a_stuck_thread_and_not_while_beaten(tmp_path):
    timeout = 1.2
    start = time.monotonic()
    script = tmp_path / "stuck.py"  # a file: the stacks show its lines
    script.write_text(STUCK.format(timeout=timeout))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), timeout=60,
    )  # fmt: skip
    ended = time.monotonic()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "beats done" in proc.stdout, out  # no report while beaten
    beats_done = float(re.search(r"beats done (\S+)", proc.stdout)[1])
    assert timeout < ended - beats_done < timeout + 3, out  # process start-up is before
    assert "watchdog: rank 3 made no progress for" in out and "step 2, phase data" in out, out
    stalled = float(re.search(r"no progress for ([\d.]+) s", out)[1])
    assert timeout <= stalled < timeout + 0.5, out
    # the stuck main thread's frame, and the report in the rank's file
    assert re.search(r"thread MainThread .*in stuck_in_io\n +time.sleep\(30\)", out, re.S), out
    assert "in stuck_in_io" in (tmp_path / "watchdog" / "rank3.txt").read_text()
    assert ended - start < 30


WAITING = """
import sys, time
import torch, torch.distributed as dist
from titan.logger import init_logger
from titan.trainer.watchdog import Watchdog

rank, port = int(sys.argv[1]), sys.argv[2]
init_logger(rank)
dist.init_process_group("gloo", init_method=f"tcp://localhost:{port}", rank=rank, world_size=2)
dist.all_reduce(torch.ones(3))
if rank == 1:  # never joins the second all-reduce
    time.sleep(60)
dog = Watchdog(1.0, rank=0, dump_folder=sys.argv[3], first_step=0)
dog.beat(7, "optimizer")
dist.all_reduce(torch.ones(5))
"""


def test_watchdog_names_the_collective_a_rank_waits_in(tmp_path):
    """gloo, 2 processes: rank 0 waits in an all-reduce that rank 1 never joins; its report
    names that all-reduce from torch's flight recorder."""
    script = tmp_path / "waiting.py"
    script.write_text(WAITING)
    port, env = str(_free_port()), {"PYTHONPATH": str(ROOT), "TORCH_FR_BUFFER_SIZE": "100"}
    cmd = [sys.executable, str(script)]
    peer = _start([*cmd, "1", port, str(tmp_path)], subprocess.DEVNULL, **env)
    try:
        proc = subprocess.run(
            [*cmd, "0", port, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
            env=_env(**env), timeout=60,
        )  # fmt: skip
    finally:
        _stop(peer)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "rank 0 made no progress for" in out and "in step 7, phase optimizer" in out, out
    waits = r"collectives in flight:\n +gloo:all_reduce on group .* inputs \[\[5\]\]"
    assert re.search(waits, out), out
    assert re.search(r"in <module>\n +dist.all_reduce\(torch.ones\(5\)\)", out), out


def test_first_step_allowance_and_close(tmp_path):
    dog = Watchdog(10.0, rank=0, dump_folder=str(tmp_path), first_step=5)
    try:
        dog.beat(5, "forward-backward")  # the first step after a resume at step 4
        assert dog.allowance() == 10.0 * FIRST_STEP_FACTOR
        dog.beat(6, "data")
        assert dog.allowance() == 10.0
    finally:
        dog.close()
    assert not dog._thread.is_alive()


def test_monitor_off_in_a_dry_run(tmp_path):
    cfg = Resilience(watchdog_timeout_s=1.0, straggler_report_freq=1)
    with StepMonitor(cfg, str(tmp_path), 0, torch.device("cpu"), 1, enabled=False) as monitor:
        assert monitor.watchdog is None and monitor.freq == 0
    with StepMonitor(cfg, str(tmp_path), 0, torch.device("cpu"), 1) as monitor:
        assert monitor.watchdog is not None  # world size 1: no straggler report
        assert monitor.freq == 0
    assert not monitor.watchdog._thread.is_alive()


def test_straggler_report_names_the_slowest_and_flags():
    times = [(1.0, 0.05), (1.42, 0.05), (1.01, 0.20), (0.99, 0.05)]
    assert straggler_report(1, 100, times) == (
        "stragglers steps 1-100 (median step 1.005 s, data 0.050 s over 4 ranks): "
        "rank 1 step 1.420 s (1.41x median), data 0.050 s (1.0x) SLOW; "
        "rank 2 step 1.010 s (1.00x median), data 0.200 s (4.0x) SLOW"
    )
    # nobody flagged: the slowest is still named, without SLOW
    even = straggler_report(4, 4, [(1.0, 0.0), (1.001, 0.0)])
    assert even.startswith("stragglers step 4 (median step 1.000 s")
    assert even.endswith("rank 1 step 1.001 s (1.00x median), data 0.000 s (1.0x)")


def test_sleep_fault_only_in_the_first_attempt(monkeypatch):
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("sleep@3/1=60"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert faults.fault("sleep", 3, 1).value == 60 and faults.fault("sleep", 3, 0) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.fault("sleep", 3, 1) is None


SMALL = [
    "--training.seq_len", "64", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
    "--training.device", "cpu",
]  # fmt: skip


@pytest.mark.heavy  # 20 s
def test_slow_rank_named_in_the_straggler_report(tmp_path):
    """FSDP over 2 processes, rank 1 sleeping 1.5 s in every step: both reports name it (the
    first step, a warm-up, is left out; step 2 is still noisy by a few tenths on 2 cores)."""
    log = _train(
        tmp_path, *SMALL, "--training.steps", "6", "--resilience.straggler_report_freq", "3",
        NGPU="2", TITAN_FAULT_INJECTION="sleep@*/1=1.5",
    )  # fmt: skip
    reports = re.findall(r"stragglers (steps? [\d-]+) .*?: rank (\d) step ([\d.]+) s.*SLOW", log)
    named = [(steps, rank) for steps, rank, _ in reports]
    assert named == [("steps 2-3", "1"), ("steps 4-6", "1")], log
    medians = [float(m) for m in re.findall(r"median step ([\d.]+) s", log)]
    for (_, _, slow), median in zip(reports, medians, strict=True):
        assert float(slow) - median > 0.5, log  # a third of the sleep above a median of 2


@pytest.mark.heavy
def test_hung_rank_watchdog_restarts_and_resumes(tmp_path):
    """MAX_RESTARTS=1, FSDP over 2 processes, a checkpoint every step: rank 1 sleeps 600 s in
    step 3. Its watchdog (4 s) reports its stack and exits 1; torchrun restarts the group, which
    resumes from step 2 and logs the uninterrupted run's losses."""
    timeout, args = 4.0, [*SMALL, "--training.steps", "5"]
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "1"]
    expected = _losses(_train(tmp_path / "uninterrupted", *args, *ckpt, NGPU="2"))
    assert sorted(expected) == [1, 2, 3, 4, 5]

    dump = tmp_path / "hung"
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={dump}", *args, *ckpt]
    cmd += ["--resilience.watchdog_timeout_s", str(timeout)]
    proc = _start(
        cmd, subprocess.PIPE, NGPU="2", MAX_RESTARTS="1", LOG_RANK="0,1",
        TITAN_FAULT_INJECTION="sleep@3/1=600",
    )  # fmt: skip
    timer = threading.Timer(300, _stop, [proc])
    timer.start()
    lines, saved_2, fired = [], None, None
    try:
        for line in proc.stdout:  # torchrun streams the ranks' output as it is written
            lines.append(line)
            if saved_2 is None and "checkpoint step 2: saved" in line:
                saved_2 = time.monotonic()
            if fired is None and "watchdog: rank 1 made no progress" in line:
                fired = time.monotonic()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _stop(proc)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert saved_2 is not None and fired is not None, log[-4000:]
    assert timeout < fired - saved_2 < timeout + 5, log[-4000:]  # "a few seconds", on 2 cores
    stalled = float(re.search(r"rank 1 made no progress for ([\d.]+) s in step 3", log)[1])
    assert timeout <= stalled < timeout + 3, log[-4000:]
    assert re.search(r"\[rank1\]: +time.sleep\(sleep.value\)", log), log[-4000:]
    assert "in train_step" in (dump / "watchdog" / "rank1.txt").read_text()
    resumed = re.findall(r"checkpoint: resumed from \S+/step-(\d+)", log)
    assert resumed == ["2"], log[-4000:]
    before, after = log.split("checkpoint: resumed from")
    assert _losses(before) == {s: expected[s] for s in (1, 2)}, log[-4000:]
    assert _losses(after) == {s: expected[s] for s in (3, 4, 5)}, log[-4000:]
