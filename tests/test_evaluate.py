"""From the command line: validation during training leaves the run's losses unchanged, and
scripts/evaluate.py gives the logged validation loss for the run's checkpoint, from its DCP
folder, its Hugging Face export, and under tensor parallel with torchrun."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from parallel_harness import load_script

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--training.steps", "4", "--training.seq_len", "64", "--training.local_batch_size", "4",
       "--metrics.log_freq", "1", "--data.holdout_every", "10",
       "--training.device", "cpu"]  # fmt: skip
VALIDATE = ["--validation.enable", "--validation.freq", "2", "--validation.steps", "3",
            "--checkpoint.enable", "--checkpoint.interval", "4"]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "TITAN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CONFIG_FILE": str(ROOT / "titan/train_configs" / "debug_model.toml")}  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], expect: int = 0) -> str:
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == expect, log[-4000:]
    return log


def _train(folder: Path, *args: str) -> list[str]:
    log = _run([str(ROOT / "run_train.sh"), f"--job.dump_folder={folder}", *RUN, *args])
    return re.findall(r"step: +\d+ +loss: \S+ +grad_norm: \S+", log)


def _evaluate(*args: str, nproc: int = 1) -> dict:
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py")]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={port}", *cmd[1:]]  # fmt: skip
    log = _run([*cmd, *args, "--steps", "3"])
    return json.loads(log[log.index("{\n") : log.rindex("}") + 1])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step debug run that validates at steps 2 and 4 and saves step 4."""
    folder = tmp_path_factory.mktemp("validated")
    with_validation = _train(folder, *VALIDATE)
    without = _train(tmp_path_factory.mktemp("plain"))
    assert len(with_validation) == 4 and with_validation == without  # the same losses and norms
    return folder


def _logged_validation(folder: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["validation/loss"] for x in lines if "validation/loss" in x}


def test_evaluate_gives_the_logged_validation_loss(run, tmp_path):
    logged = _logged_validation(run)
    assert sorted(logged) == [2, 4] and logged[2] != logged[4]
    ckpt = run / "checkpoint" / "step-4"
    one = _evaluate(str(ckpt))  # the run's own config.toml: its model and data
    assert one["format"] == "dcp" and one["targets"] == 3 * 4 * 64 and one["layout"] == "1 process"
    assert abs(one["loss"] - logged[4]) <= 1e-6, (one, logged)
    # tensor parallel over two processes: the same windows, the same loss
    tp = _evaluate(str(ckpt), "--parallelism.tensor_parallel_degree", "2",
                   "--parallelism.data_parallel_shard_degree", "1", nproc=2)  # fmt: skip
    assert tp["layout"] == "tp 2" and tp["targets"] == one["targets"]
    assert abs(tp["loss"] - logged[4]) <= 1e-5, (tp, logged)
    # the fp32 Hugging Face export of the checkpoint, read by titan's HF loader
    hf = tmp_path / "hf"
    convert = load_script("convert_to_hf")
    assert convert.main([str(ckpt), str(hf), "--flavor", "debugmodel", "--dtype", "float32"]) == 0
    out = tmp_path / "eval.json"
    got = _evaluate(str(hf), "--config", str(run / "config.toml"), "--json-out", str(out))
    assert got["format"] == "hf" and abs(got["loss"] - logged[4]) <= 1e-6, (got, logged)
    assert json.loads(out.read_text()) == got


def test_evaluate_errors(run, tmp_path):
    log = _run([sys.executable, "scripts/evaluate.py", str(tmp_path)], expect=1)
    assert "is neither a titan DCP folder (.metadata) nor a transformers one (config.json)" in log
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 2304}))  # fmt: skip
    log = _run([sys.executable, "scripts/evaluate.py", str(hf)], expect=1)
    assert "config.json does not match --flavor debugmodel" in log
    assert "(pass the matching --model.flavor)" in log
