"""benchmarks/throughput.py end to end: tiny settings, titan against the Hugging Face loop."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers  # noqa: F401  (--vs-hf trains its Llama: a missing install fails here)

ROOT = Path(__file__).resolve().parents[1]


def _block(lines: list[str], name: str) -> dict[str, str]:
    """The `  key: value` lines under the line `name:`."""
    start = lines.index(f"{name}:") + 1
    block = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        key, value = line.strip().split(":", 1)
        block[key] = value.strip()
    return block


def test_throughput_vs_hf_reports_ratio_and_matching_first_loss():
    cmd = [
        sys.executable, str(ROOT / "benchmarks/throughput.py"),
        "--config", str(ROOT / "titan/train_configs/debug_model.toml"),
        "--steps", "2", "--warmup", "1", "--vs-hf",
        "--training.seq_len", "64", "--training.local_batch_size", "2",
        # fp32 on CPU everywhere: under bf16 autocast on a GPU the two losses differ by ~1e-2
        "--training.device", "cpu",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio titan/hf: \d+\.\d\d", lines[-1]), lines[-1]
    ratio = float(lines[-1].split(": ")[1])
    blocks = {name: _block(lines, name) for name in ("titan", "hf")}
    tps = {name: float(b["tokens/s (per device)"].replace(",", "")) for name, b in blocks.items()}
    sizes = re.search(r"per step (\d+) x (\d+) x (\d+) tokens", run.stdout).groups()
    assert sizes == ("1", "2", "64")
    for name, block in blocks.items():
        # tokens/s is a step's 128 tokens over the mean step time (printed to 0.1 ms)
        step_ms = float(block["step time"].removesuffix(" ms"))
        assert 128e3 / (step_ms + 0.05) - 0.5 <= tps[name] <= 128e3 / (step_ms - 0.05) + 0.5
    # tokens/s print rounded to integers and the ratio to 2 decimals: bound what they allow
    low = (tps["titan"] - 0.5) / (tps["hf"] + 0.5) - 0.005
    high = (tps["titan"] + 0.5) / (tps["hf"] - 0.5) + 0.005
    assert low <= ratio <= high, (ratio, tps)
    diff_line = next(line for line in lines if line.startswith("first-step loss abs diff:"))
    diff, titan_loss, hf_loss = map(
        float, re.fullmatch(r".*: (\S+) \(titan (\S+), hf (\S+)\)", diff_line).groups()
    )
    # Same initial weights and batches in fp32: the two models compute the same loss.
    assert diff < 1e-4, diff_line
    # the losses print 6 decimals, each rounded by up to 5e-7
    assert diff == pytest.approx(abs(titan_loss - hf_loss), abs=1.1e-6)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_loop_replicates_titan_optimizer_groups_and_schedule():
    bench = load_benchmark()
    ns, overrides = bench.parse_args(
        ["--config", str(ROOT / "titan/train_configs/debug_model.toml"), "--steps", "4",
         "--training.seq_len", "32", "--training.device", "cpu", "--optimizer.weight_decay", "0.3"]
    )  # fmt: skip
    trainer = bench.Trainer(bench.build_config(ns, overrides))
    assert trainer.cfg.data.dataset == "synthetic" and trainer.cfg.training.steps == 3 + 4
    titan, hf = bench.titan_loop(trainer), bench.hf_loop(trainer)
    assert type(hf.optimizer) is type(titan.optimizer)
    for ref, got in zip(titan.optimizer.param_groups, hf.optimizer.param_groups, strict=True):
        assert {p.ndim for p in got["params"]} == {p.ndim for p in ref["params"]}
        assert sum(p.numel() for p in got["params"]) == sum(p.numel() for p in ref["params"])
        for key in ("lr", "initial_lr", "betas", "eps", "weight_decay", "foreach", "fused"):
            assert got[key] == ref[key], key
    assert {g["weight_decay"] for g in hf.optimizer.param_groups} == {0.3, 0.0}
