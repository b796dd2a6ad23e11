"""Preemption and errors under torchrun: a signal to torchrun (or to Slurm's batch script) makes
every rank save the step in progress, and the next run resumes with the uninterrupted losses;
an error on a rank that LOG_RANK hides still reaches the output, through torchrun's summary."""

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_launch import (
    ROOT,
    SMALL,
    TP2,
    _fake_slurm,
    _losses,
    _start,
    _stop,
    _train,
    _wait_all,
)

from titan.checkpoint.checkpointer import complete_steps
from titan.trainer import preemption

STEP_LINE = re.compile(r"\[titan\] \S+ (\d\d):(\d\d):(\d\d),(\d{3}) INFO step: +(\d+) +loss:")
# torchrun's agent logs this just before it forwards the signal to each rank
FORWARDED = re.compile(r"^W\d{4} (\d\d):(\d\d):(\d\d)\.(\d+) .* closing signal SIG", re.M)


def _seconds(h: str, m: str, s: str, frac: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + float(f"0.{frac}")


def _signalled(dump: Path, args: list[str], sig: int, delay: float, **env: str):
    """(exit status, log): run_train.sh with NGPU=2; `delay` s after the first step line, `sig`
    goes to torchrun (run_train.sh execs it, so that is the launch's pid)."""
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={dump}", *args]
    proc = _start(cmd, subprocess.PIPE, NGPU="2", **env)
    guard = threading.Timer(240, _stop, [proc])
    guard.start()
    lines, timer = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if timer is None and STEP_LINE.search(line):
                timer = threading.Timer(delay, os.kill, [proc.pid, sig])
                timer.start()
        proc.wait()
    finally:
        guard.cancel()
        if proc.poll() is None:
            _stop(proc)
    return proc.returncode, "".join(lines)


def _check_preempted(dump: Path, log: str, sig: int, expected: dict[int, float]) -> int:
    """The run stopped on `sig` after saving the step in progress when torchrun forwarded the
    signal (the last one logged before, or the next), and logged the uninterrupted losses."""
    forwarded = FORWARDED.search(log)
    assert forwarded, log[-3000:]
    at = _seconds(*forwarded.groups())
    logged = [(int(m[4]), _seconds(*m[:4])) for m in STEP_LINE.findall(log)]
    before = [step for step, t in logged if t <= at]
    assert before, log[-3000:]
    name = signal.Signals(sig).name
    stopped = re.findall(rf"preempted: stopped after step (\d+) on {name}; its checkpoint", log)
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0])
    assert step in (before[-1], before[-1] + 1), (before, log[-3000:])
    assert complete_steps(dump / "checkpoint")[-1] == step
    losses = _losses(log)
    assert max(losses) == step and losses == {s: expected[s] for s in losses}
    return step


def _resumed_from(log: str) -> int:
    found = re.findall(r"checkpoint: resumed from \S+/step-(\d+)", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


PREEMPT_ARGS = [
    "--training.steps", "8", "--training.seq_len", "64", "--training.local_batch_size", "2",
    "--metrics.log_freq", "1", "--training.device", "cpu",
    "--checkpoint.enable", "--checkpoint.interval", "3",
]  # fmt: skip


@pytest.mark.heavy
def test_preempted_twice_resumes_with_uninterrupted_losses(tmp_path):
    """SIGTERM to torchrun, then SIGUSR1 (Slurm's warning signal) to the resumed run with
    MAX_RESTARTS=1: each saves the step in progress, torchrun exits 1 without restarting, and
    the losses are the uninterrupted run's."""
    expected = _losses(_train(tmp_path / "whole", *PREEMPT_ARGS, NGPU="2"))
    assert sorted(expected) == list(range(1, 9))
    dump = tmp_path / "preempted"
    code, log = _signalled(dump, PREEMPT_ARGS, signal.SIGTERM, delay=0.0)
    assert code == 1, log[-3000:]
    first = _check_preempted(dump, log, signal.SIGTERM, expected)
    code, log = _signalled(dump, PREEMPT_ARGS, signal.SIGUSR1, delay=0.2, MAX_RESTARTS="1")
    assert code == 1, log[-3000:]
    assert _resumed_from(log) == first
    assert log.count("INFO run 'Llama 3 debug model'") == 1  # no restart in place
    _check_preempted(dump, log, signal.SIGUSR1, expected)


@pytest.mark.heavy
def test_preempted_at_ten_random_moments(tmp_path):
    """SIGTERM to torchrun at TITAN_MOMENTS (default 5 in CI's heavy step; 10 by hand:
    `TITAN_MOMENTS=10 ./run_tests.sh -m heavy -k ten_random`, 3 min) random moments of a chain
    of resumed runs (async interval saves, so some land while one is in flight): each time the
    step in progress is saved and every logged loss is the uninterrupted run's."""
    args = [*PREEMPT_ARGS, "--training.steps", "40", "--checkpoint.async_mode", "async"]
    expected = _losses(_train(tmp_path / "whole", *args, NGPU="2"))
    assert sorted(expected) == list(range(1, 41))
    dump, rng, step = tmp_path / "preempted", random.Random(), 0
    for _ in range(int(os.environ.get("TITAN_MOMENTS", 5))):
        code, log = _signalled(dump, args, signal.SIGTERM, delay=rng.uniform(0.0, 1.5))
        assert code == 1, log[-3000:]
        if step:
            assert _resumed_from(log) == step
        step = _check_preempted(dump, log, signal.SIGTERM, expected)


def test_one_process_without_checkpoints_exits_143(tmp_path):
    """NGPU=1 runs titan without torchrun: SIGTERM gives the documented status, and with
    checkpointing off the log says that nothing was saved."""
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", *SMALL,
           "--training.steps", "50"]  # fmt: skip
    proc = _start(cmd, subprocess.PIPE, NGPU="1")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"step: +1 +loss:", line):
                proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _stop(proc)
    log = "".join(lines)
    assert proc.returncode == preemption.PREEMPTED_EXIT == 143, log[-3000:]
    assert re.search(r"stopped after step \d+ on SIGTERM; checkpoint.enable is off: nothing", log)


def test_signal_before_a_step_saves_it_in_process(tmp_path):
    """The flag, the agreement and the save without a launcher: a signal caught before step 1
    ends stops the run after step 1 with a full checkpoint that a new run resumes from."""
    from test_train import make_trainer

    old = signal.getsignal(signal.SIGUSR1)
    args = ("--training.steps", "5", "--checkpoint.enable", "--checkpoint.interval", "10")
    try:
        preemption.install(["SIGUSR1"])
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(preemption.Preempted, match="after step 1 on SIGUSR1; its checkpoint"):
            make_trainer(tmp_path, *args).train()
    finally:
        preemption._received.clear()
        signal.signal(signal.SIGUSR1, old)
    assert complete_steps(tmp_path / "checkpoint") == [1]
    assert make_trainer(tmp_path, *args).step == 1  # full: the step and optimizer come back


def test_training_gives_the_signals_back(tmp_path):
    """A run in this process catches the signals only while it trains: afterwards SIGTERM and
    SIGUSR1 act as before (a test runner, a notebook) and nothing caught is remembered."""
    from test_train import make_trainer

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    make_trainer(tmp_path, "--training.steps", "1", "--training.seq_len", "32").train()
    assert {s: signal.getsignal(s) for s in before} == before
    assert not preemption.requested()


def _failed(*args: str, **env: str) -> tuple[int, str]:
    cmd = [str(ROOT / "run_train.sh"), *args]
    proc = _start(cmd, subprocess.PIPE, NGPU="2", **env)
    try:
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            _stop(proc)
    return proc.returncode, log


RANK1_CONFIG = "rank 1 rejects the config (TITAN_FAULT_INJECTION config_error)"
RANK1_RAISE = "RuntimeError: rank 1 fails in step 1 (TITAN_FAULT_INJECTION raise)"


def _rank1_fails(tmp_path: Path, fault: str, message: str) -> None:
    """Rank 1 alone fails, with LOG_RANK=0 (default): its message is in torchrun's output."""
    code, log = _failed(f"--job.dump_folder={tmp_path}", *SMALL, TITAN_FAULT_INJECTION=fault)
    assert code == 1 and message in log, log[-4000:]


def test_a_handled_error_is_written_to_torchruns_error_file(tmp_path, monkeypatch):
    """What torchrun's summary prints for a rank: its error file holds titan's one line."""
    import json

    from titan.train import main

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    args = ["--parallelism.context_parallel_rotate_method", "ring9"]
    assert main(["--job.dump_folder", str(tmp_path), *args]) == 2
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("titan: bad config: parallelism.context_parallel_rotate_method = "
                              "'ring9' is not one of allgather, alltoall"), message  # fmt: skip


@pytest.mark.heavy  # 16 s; in the suite: the error file above
def test_rank1_errors_reach_the_output(tmp_path):
    _rank1_fails(tmp_path, "config_error@0/1", RANK1_CONFIG)
    _rank1_fails(tmp_path, "raise@1/1", RANK1_RAISE)


@pytest.mark.heavy
def test_rank1_errors_reach_the_output_every_time(tmp_path):
    """TITAN_RACES (default 5; 20 by hand: `TITAN_RACES=20 ./run_tests.sh -m heavy -k every_time`,
    6 min) races of each rank-1 failure, and the issue's two commands (every rank rejects them;
    whichever exits first, torchrun's summary shows titan's line)."""
    for _ in range(int(os.environ.get("TITAN_RACES", 5))):
        _rank1_fails(tmp_path, "config_error@0/1", RANK1_CONFIG)
        _rank1_fails(tmp_path, "raise@1/1", RANK1_RAISE)
    code, log = _failed("--parallelism.context_parallel_rotate_method", "ring9")
    assert code == 1 and "traceback : titan: bad config: parallelism.context_parallel_rotate_" \
        "method = 'ring9' is not one of" in log, log[-4000:]  # fmt: skip
    csv = "--parallelism.pipeline_parallel_schedule_csv"
    code, log = _failed("--parallelism.pipeline_parallel_degree", "2", csv, "/absent.csv")
    assert code == 1 and "traceback : titan: " in log and "'/absent.csv': no such file" in log


def test_slurm_time_limit_saves_and_requeues(tmp_path):
    """train.sbatch under stand-ins for srun and scontrol: Slurm's USR1 to the batch script
    (--signal=B:USR1@120) reaches both nodes' torchrun through srun, they save the step in
    progress, and the script requeues the job."""
    job_id, slurm = _fake_slurm(tmp_path)
    dump = tmp_path / "dump"
    cmd = ["bash", str(ROOT / "scripts/slurm/train.sbatch"), *PREEMPT_ARGS, *TP2,
           "--training.steps", "50", f"--job.dump_folder={dump}"]  # fmt: skip
    with open(tmp_path / "sbatch.log", "w") as out:
        proc = _start(cmd, out, cwd=tmp_path, FAKE_SLURM_DIR=str(tmp_path), **slurm)
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    deadline = time.monotonic() + 180
    while not any(p.exists() and "INFO step:" in p.read_text() for p in logs):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    [code] = _wait_all([proc], timeout=180)
    text = "".join(p.read_text() for p in [tmp_path / "sbatch.log", *logs])
    stopped = re.findall(r"preempted: stopped after step (\d+) on SIGUSR1", text)
    assert code == 1 and stopped and len(set(stopped)) == 1, text[-4000:]  # one line per node
    assert (tmp_path / "requeue_args").read_text().split() == ["requeue", str(job_id)]
    assert complete_steps(dump / "checkpoint")[-1] == int(stopped[0])
