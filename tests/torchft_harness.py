"""Run titan under torchft on CPU/gloo: scripts/torchft_local.sh (a lighthouse and replica groups
of run_train.sh jobs), optionally SIGKILLing a worker of one group at a step, and read what each
group logged (metrics.jsonl) and saved (its last checkpoint, as one torch-save file).

`run_ft(folder, groups, ngpu, args, kill=None)` -> {group: [(step, loss), ...]};
`run_plain(folder, ngpu, args)` -> [(step, loss), ...]; `final_state(folder, group)` -> the
group's last checkpoint as a flat {key: tensor} (model and optimizer).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs/debug_model.toml")
ARGS = [
    "--training.seq_len", "32", "--training.local_batch_size", "2", "--data.dataset",
    "synthetic", "--lr_scheduler.warmup_steps", "0", "--metrics.log_freq", "1",
    "--optimizer.lr", "1e-4", "--training.device", "cpu",
]  # fmt: skip


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "TITAN_PYTHON": sys.executable, "CONFIG_FILE": DEBUG_TOML}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "COMM_MODE"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **{k: str(v) for k, v in extra.items()}}


def rows(folder: Path) -> list[dict]:
    """The training lines of the folder's metrics.jsonl (step, loss, ..., under torchft
    ft_groups and targets)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if "loss" in r]


def metrics(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(folder)]


def run_plain(folder: Path, ngpu: int, args: list[str], timeout: int = 600):
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={folder}", *ARGS, *args]
    out = subprocess.run(cmd, env=_env(NGPU=ngpu), capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return metrics(folder)


def _workers(group: int) -> list[int]:
    """The pids of group `group`'s titan processes (torchrun's workers, not torchrun)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"titan.train" in cmd and b"torch.distributed.run" not in cmd:
            if b"--fault_tolerance.replica_group" in cmd:
                i = cmd.index(b"--fault_tolerance.replica_group")
                if cmd[i + 1] == str(group).encode():
                    pids.append(int(proc.name))
    return pids


def run_ft(
    folder: Path,
    groups: int,
    ngpu: int,
    args: list[str],
    kill: tuple[int, int] | None = None,
    min_replicas: int | None = None,
    timeout: int = 600,
    port: int = 29510,
    **extra_env,
) -> dict[int, list[tuple[int, float]]]:
    """Train under torchft; `kill` = (group, step): once that group has logged the step, one of
    its workers (picked at random) gets SIGKILL and the launcher restarts the group."""
    env = _env(
        **extra_env, REPLICA_GROUPS=groups, NGPU=ngpu, RESTART=int(kill is not None),
        MIN_REPLICAS=min_replicas or groups, LOG_DIR=folder / "logs",
        LIGHTHOUSE_PORT=port, GROUP_PORT=port + 100,
    )  # fmt: skip
    cmd = [str(ROOT / "scripts/torchft_local.sh"), f"--job.dump_folder={folder}", *ARGS, *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    start = time.monotonic()
    try:
        if kill is not None:
            group, step = kill
            while not any(s >= step for s, _ in metrics(folder / f"replica_{group}")):
                assert proc.poll() is None, proc.stdout.read()[-4000:]
                assert time.monotonic() - start < timeout, "the group never reached the step"
                time.sleep(0.05)
            victim = random.choice(_workers(group))
            os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=max(1, timeout - (time.monotonic() - start)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((folder / "logs").glob("*.log")))
    assert proc.returncode == 0, out[-2000:] + logs
    return {g: metrics(folder / f"replica_{g}") for g in range(groups)}


def final_state(folder: Path, group: int) -> dict[str, torch.Tensor]:
    """The group's newest checkpoint (model, optimizer, ...) as flat {key: tensor}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpts = sorted((folder / f"replica_{group}" / "checkpoint").glob("step-*"),
                   key=lambda p: int(p.name.split("-")[1]))  # fmt: skip
    out = folder / f"final_{group}.pt"
    dcp_to_torch_save(ckpts[-1], out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(value):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat
