"""titan installed as a user installs it: pip builds it into a fresh virtual environment and every
console command runs from an empty folder, with no checkout on the path.

Nothing is downloaded: the new environment sees the running one's packages (torch, ..., and pip
and setuptools, which build titan) through a .pth file listing this environment's site-packages,
and pip installs titan alone (--no-deps --no-index) from a copy of the checkout's pyproject.toml,
README.md and titan/. 45 to 75 s on a 2-core machine.
"""

import concurrent.futures
import json
import math
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from titan.checkpoint.dcp_io import load_dcp_model
from titan.cli import evaluate, plot
from titan.config.job_config import Metrics
from titan.errors import ConfigError
from titan.models.llama3 import FLAVORS
from titan.models.llama3.hf_io import empty_model
from titan.trainer.metrics import MetricsLogger

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "titan-train", "titan-convert-to-hf", "titan-convert-from-hf", "titan-generate",
    "titan-evaluate", "titan-plan", "titan-preprocess", "titan-plot", "titan-verify-checkpoint",
    "titan-download",
}  # fmt: skip
# 5 steps of 2 x 64 tokens on the CPU, a checkpoint at the last
TRAIN = [
    "--job.config_file", "debug_model.toml", "--job.dump_folder", "run", "--training.steps", "5",
    "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.device", "cpu",
    "--checkpoint.enable", "--checkpoint.interval", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> SimpleNamespace:
    """A new environment with titan pip-installed, and an empty folder to run its commands in."""
    tmp = tmp_path_factory.mktemp("install")
    src, env_dir, work = tmp / "src", tmp / "venv", tmp / "work"
    # --without-pip: this environment's pip and setuptools serve (ensurepip's are older, and slow)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # after the new site-packages on sys.path: the installed titan comes first
    Path(purelib, "running_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "titan", src / "titan", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "HF_HOME": str(tmp / "hf"),
        "OMP_NUM_THREADS": "1", "PIP_CONFIG_FILE": os.devnull,
    }  # fmt: skip
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    install = subprocess.run(
        [*pip, "--no-cache-dir", "--disable-pip-version-check", str(src)], cwd=work, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return SimpleNamespace(dir=env_dir, work=work, env=env)


def run(venv: SimpleNamespace, *cmd: str, **env: str) -> subprocess.CompletedProcess:
    """A command of the new environment, in the empty folder, under the clean environment."""
    exe = venv.dir / "bin" / cmd[0]
    return subprocess.run(
        [str(exe), *cmd[1:]], cwd=venv.work, env={**venv.env, **env}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_the_installed_titan_runs_not_the_checkout(venv):
    out = run(venv, "python", "-c", "import titan.cli, titan.train; print(titan.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(venv.dir), out.stdout


def test_every_command_shows_its_help(venv):
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert set(tomllib.load(f)["project"]["scripts"]) == COMMANDS
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        outs = pool.map(lambda c: run(venv, c, "--help"), COMMANDS)
        helps = dict(zip(COMMANDS, outs, strict=True))
    for name, out in helps.items():
        assert out.returncode == 0, f"{name}: {out.stderr[-3000:]}"
        # argparse's usage line, or the trainer's list of config keys
        expected = "--training.steps" if name == "titan-train" else f"usage: {name} "
        assert expected in out.stdout, f"{name}: {out.stdout[-2000:]}"


def test_train_then_convert_to_hf_and_back(venv):
    """A shipped config by name trains and checkpoints; its export to Hugging Face and back
    holds the checkpoint's weights exactly."""
    out = run(venv, "titan-train", *TRAIN)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = venv.work / "run"
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5]
    with (folder / "config.toml").open("rb") as f:
        assert tomllib.load(f)["job"]["config_file"] == "debug_model.toml"
    ckpt = folder / "checkpoint" / "step-5"
    hf_args = ["--flavor", "debugmodel", "--dtype", "float32"]
    out = run(venv, "titan-convert-to-hf", str(ckpt), "hf", *hf_args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (venv.work / "hf" / "config.json").is_file()
    out = run(venv, "titan-convert-from-hf", "hf", "dcp", *hf_args)
    assert out.returncode == 0, out.stderr[-3000:]

    def weights(dcp_dir: Path) -> dict[str, torch.Tensor]:
        state = empty_model(FLAVORS["debugmodel"]).state_dict()
        for t in state.values():
            t.fill_(math.nan)  # a weight the folder does not hold stays NaN: never equal
        return load_dcp_model(dcp_dir, state)

    trained, back = weights(ckpt), weights(venv.work / "dcp")
    assert set(back) == set(trained) and len(trained) == 57
    for name, w in trained.items():
        assert torch.equal(back[name], w), name


def test_dry_run_of_a_shipped_config(venv):
    """COMM_MODE=fake_backend as run_train.sh starts it: rank 0 of the 8 ranks llama3_8b.toml is
    written for traces one FSDP step of the 8B model."""
    fake = dict(COMM_MODE="fake_backend", WORLD_SIZE="8", RANK="0", LOCAL_RANK="0")
    args = ["--job.config_file", "llama3_8b.toml", "--job.dump_folder", "dry"]
    out = run(venv, "titan-train", *args, "--training.device", "cpu", **fake)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((venv.work / "dry" / "dry_run.json").read_text())
    (rank,) = report["ranks"]
    assert report["fits"] and rank["rank"] == 0
    assert rank["held"]["parameters"] * 8 == 4 * 8_030_261_248  # fp32, sharded over 8


def test_missing_extras_name_their_pip_extra(tmp_path, monkeypatch, capsys):
    """Without matplotlib or a tracker's package the command stops with one line naming the
    extra to install (a None entry in sys.modules makes an import fail)."""
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (
        "error: plotting needs matplotlib: pip install 'titan[plot]'\n"
    )
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    cpu = dict(rank=0, device=torch.device("cpu"), flops_per_token=1, peak_flops=None)
    for key, package in (("enable_tensorboard", "tensorboard"), ("enable_wandb", "wandb")):
        with pytest.raises(ConfigError) as e:
            MetricsLogger(Metrics(**{key: True}), str(tmp_path), **cpu)
        assert str(e.value) == (
            f"metrics.{key} needs {package}: pip install 'titan[trackers]' (or turn it off)"
        )
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "titan.cli.lm_eval_backend", raising=False)
    args, overrides = evaluate.parse_args([str(tmp_path), "--tasks", "hellaswag"])
    with pytest.raises(ConfigError, match=r"^--tasks needs lm-eval: pip install 'titan\[eval\]'$"):
        evaluate.evaluate_tasks(args, overrides)
