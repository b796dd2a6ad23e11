"""run_train.sh beyond one machine: torchrun nodes joined by the c10d rendezvous (NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT), the Slurm batch script with Slurm's variables, and
MAX_RESTARTS resuming from the newest checkpoint after a rank is killed. Every "node" here is a
torchrun on localhost, on CPU with gloo."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs" / "debug_model.toml")
SMALL = [
    "--training.steps", "3", "--training.seq_len", "64", "--training.local_batch_size", "2",
    "--metrics.log_freq", "1", "--training.device", "cpu",
]  # fmt: skip
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
# What a launch must not inherit from the shell that runs the tests (which may be a Slurm job).
LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
    "NGPU", "LOG_RANK", "MAX_RESTARTS", "RDZV_ID", "COMM_MODE",
)  # fmt: skip


def _env(**env: str) -> dict[str, str]:
    """This venv's Python, one thread per process (2 cores), no inherited launch settings."""
    base = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    return {
        **base, "TITAN_PYTHON": sys.executable, "CONFIG_FILE": DEBUG_TOML, "OMP_NUM_THREADS": "1",
        **env,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state, ppid, ...
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and every process under it (torchrun's workers have their own sessions,
    and a node left behind would wait for its rendezvous for minutes)."""
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += _children(pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(cmd: list[str], out, cwd: Path = ROOT, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=_env(**env), stdout=out, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes. Once one launch fails, or at the timeout, the others are killed with their
    workers (as srun --kill-on-bad-exit does): a node left alone waits for its peers for minutes.
    """
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _stop(p)
    return [p.wait() for p in procs]


def _train(dump: Path, *args: str, **env: str) -> str:
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={dump}", *args]
    proc = _start(cmd, subprocess.PIPE, **env)
    timer = threading.Timer(300, _stop, [proc])
    timer.start()
    try:
        log = proc.communicate()[0]
    finally:
        timer.cancel()
    assert proc.returncode == 0, log[-4000:]
    return log


def _losses(log: str) -> dict[int, float]:
    """The loss of each step in the metrics lines (6 decimals); a step logged again after a
    restart keeps its last value."""
    return {int(s): float(x) for s, x in re.findall(r"step: +(\d+) +loss: (\d+\.\d{6})", log)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[int, float]:
    """The losses of one process (run_train.sh with NGPU=1) on SMALL: TP 2 has dp degree 1, so
    its data is this run's."""
    log = _train(tmp_path_factory.mktemp("one_process"), *SMALL, NGPU="1")
    assert "run_train.sh: node" not in log  # one process starts without torchrun, as before
    losses = _losses(log)
    assert sorted(losses) == [1, 2, 3], log[-3000:]
    return losses


def test_two_nodes_tp2_equal_one_process(tmp_path, one_process):
    port = _free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    procs = []
    for rank, path in enumerate(logs):
        with open(path, "w") as out:
            procs.append(_start(
                [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", *SMALL, *TP2], out,
                NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="localhost", MASTER_PORT=str(port),
                NGPU="1",
            ))  # fmt: skip
    codes = _wait_all(procs, timeout=240)
    texts = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    for rank, text in enumerate(texts):
        assert f"run_train.sh: node {rank} of 2 (NGPU=1 each), rendezvous localhost:{port}" in text
    both = "".join(texts)  # global rank 0 is on whichever node torchrun numbered first
    assert both.count("parallel layout: tp 2 over 2 ranks") == 1, both[-3000:]
    losses = _losses(both)
    assert sorted(losses) == [1, 2, 3], both[-3000:]
    # TP sums the matmuls in another order: 1.3e-6 from one process after two updates in fp32.
    assert [losses[s] for s in (1, 2, 3)] == pytest.approx(
        [one_process[s] for s in (1, 2, 3)], abs=3e-6, rel=0
    )


SCONTROL = """#!/usr/bin/env bash
# Stands in for Slurm's scontrol: the job's node list, node 0 first; a requeue is recorded.
if [ "$1" = requeue ]; then echo "$@" > "$FAKE_SLURM_DIR/requeue_args"; exit 0; fi
echo "$@" > "$FAKE_SLURM_DIR/scontrol_args"
printf 'localhost\\nnode02.invalid\\n'
"""
SRUN = """#!/usr/bin/env bash
# Stands in for Slurm's srun: one task per node, each told its node id; USR1 is forwarded to
# the tasks, as srun does.
echo "$@" > "$FAKE_SLURM_DIR/srun_args"
trap 'kill -USR1 "${pids[@]}"' USR1
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$FAKE_SLURM_DIR/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do  # a trap ends `wait` early: wait again until the task is gone
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" = 0 ] || status=1
done
exit $status
"""


def _slurm_job_id() -> int:
    """A job id whose port (run_train.sh: 20000 + id % 10000) is free here."""
    for job_id in range(4242, 14242, 97):
        with socket.socket() as s:
            try:
                s.bind(("", 20000 + job_id % 10000))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port in 20000-29999")


def _fake_slurm(tmp_path: Path) -> tuple[int, dict[str, str]]:
    """(job id, environment) of a 2-node Slurm job whose srun and scontrol are the stand-ins
    above (put first on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_id = _slurm_job_id()
    slurm = {
        "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_GPUS_ON_NODE": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(ROOT),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }  # fmt: skip
    return job_id, slurm


def test_slurm_batch_script_on_two_fake_nodes(tmp_path, one_process):
    """scripts/slurm/train.sbatch under stand-ins for srun and scontrol: every launch setting
    comes from Slurm's variables, and the two nodes train as one TP 2 run."""
    job_id, slurm = _fake_slurm(tmp_path)
    cmd = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), *SMALL, *TP2]
    cmd.append(f"--job.dump_folder={tmp_path / 'dump'}")
    # run from elsewhere: Slurm runs a copy of the script from its spool directory
    with open(tmp_path / "sbatch.log", "w") as out:
        proc = _start(cmd, out, cwd=tmp_path, FAKE_SLURM_DIR=str(tmp_path), **slurm)
    [code] = _wait_all([proc], timeout=240)
    texts = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    sbatch_log = (tmp_path / "sbatch.log").read_text()
    assert code == 0, "\n".join(text[-3000:] for text in [sbatch_log, *texts])
    assert (tmp_path / "scontrol_args").read_text().split() == ["show", "hostnames", "node[01-02]"]
    srun_args = (tmp_path / "srun_args").read_text().split()
    assert srun_args[:4] == [
        "--ntasks-per-node=1", "--cpus-per-task=1", "--kill-on-bad-exit=1", "./run_train.sh"
    ]  # fmt: skip
    assert srun_args[4:] == cmd[2:]
    port = 20000 + job_id % 10000
    for rank, text in enumerate(texts):
        assert (
            f"run_train.sh: node {rank} of 2 (NGPU=1 each), rendezvous localhost:{port} "
            f"id {job_id}, MAX_RESTARTS=0"
        ) in text, text[-3000:]
    both = "".join(texts)
    assert both.count("parallel layout: tp 2 over 2 ranks") == 1, both[-3000:]
    losses = _losses(both)
    assert sorted(losses) == [1, 2, 3], both[-3000:]
    assert [losses[s] for s in (1, 2, 3)] == pytest.approx(
        [one_process[s] for s in (1, 2, 3)], abs=3e-6, rel=0
    )


def test_slurm_dry_run_counts_every_node(tmp_path):
    """COMM_MODE=fake_backend in a Slurm job dry-runs the job's whole world: 2 nodes x 4 GPUs
    (NGPU from SLURM_GPUS_PER_NODE with its type)."""
    log = _train(
        tmp_path, "--training.device", "cpu", "--training.seq_len", "32", *TP2,
        COMM_MODE="fake_backend", SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_NODEID="0",
        SLURM_GPUS_PER_NODE="h100:4",
    )  # fmt: skip
    assert "parallel layout: dp_shard 4 x tp 2 over 8 ranks" in log, log[-3000:]


# Steps of ~0.5 s on 2 cores (seq_len 256), so that a kill after step 3 lands mid-run.
RESTART_ARGS = [
    "--training.steps", "8", "--training.seq_len", "256", "--training.local_batch_size", "2",
    "--metrics.log_freq", "1", "--training.device", "cpu",
    "--checkpoint.enable", "--checkpoint.interval", "2",
]  # fmt: skip


def _worker(torchrun: int, local_rank: int) -> int:
    for pid in _children(torchrun):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"\0LOCAL_RANK={local_rank}\0".encode() in b"\0" + environ:
            return pid
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under torchrun {torchrun}")


@pytest.mark.heavy
def test_killed_rank_restarts_and_resumes(tmp_path):
    """MAX_RESTARTS=1, FSDP over 2 processes: SIGKILL rank 1 after step 3; torchrun restarts both
    ranks, they resume from the newest checkpoint and log the uninterrupted run's losses."""
    expected = _losses(_train(tmp_path / "uninterrupted", *RESTART_ARGS, NGPU="2"))
    assert sorted(expected) == list(range(1, 9))

    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path / 'killed'}", *RESTART_ARGS]
    proc = _start(cmd, subprocess.PIPE, NGPU="2", MAX_RESTARTS="1")
    timer = threading.Timer(300, _stop, [proc])
    timer.start()
    lines, killed = [], None
    try:
        for line in proc.stdout:  # torchrun streams rank 0's output as it is written
            lines.append(line)
            if killed is None and re.search(r"step: +3 +loss:", line):
                killed = _worker(proc.pid, local_rank=1)
                os.kill(killed, signal.SIGKILL)
                lines.append(f"test: killed rank 1 (pid {killed})\n")
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _stop(proc)
    log = "".join(lines)
    assert killed is not None, log[-3000:]
    assert proc.returncode == 0, log[-4000:]
    assert "MAX_RESTARTS=1" in log
    resumed = re.findall(r"checkpoint: resumed from \S+/step-(\d+)", log)
    assert len(resumed) == 1, log[-4000:]
    start = int(resumed[0])
    assert start in (2, 4), log[-4000:]  # step 3 was logged; step 6 cannot have been saved yet
    before, after = log.split("checkpoint: resumed from")
    first, rerun = _losses(before), _losses(after)
    assert 3 in first and sorted(rerun) == list(range(start + 1, 9)), log[-4000:]
    # exact: a resume under the same layout continues bit-for-bit
    assert first == {step: expected[step] for step in first}
    assert rerun == {step: expected[step] for step in rerun}
