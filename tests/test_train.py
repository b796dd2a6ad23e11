"""The trainer end to end on the debug model: accumulation, learning, bad input, run_train.sh."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan.config import load_config
from titan.errors import ConfigError, NonFiniteLossError
from titan.logger import logger
from titan.train import main
from titan.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs/debug_model.toml")


def make_trainer(tmp_path, *overrides: str) -> Trainer:
    # CPU even where a GPU is visible: these tests compare fp32 numerics
    args = [
        "--job.dump_folder",
        str(tmp_path),
        "--metrics.log_freq",
        "1000",
        "--training.device",
        "cpu",
    ]
    args += overrides
    return Trainer(load_config(args, config_file=DEBUG_TOML))


def grads_after(trainer: Trainer) -> dict[str, torch.Tensor]:
    data = iter(trainer.dataloader)
    trainer.forward_backward([next(data) for _ in range(trainer.grad_accum_steps)])
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    common = ("--training.seq_len", "64", "--training.global_batch_size", "8")
    big = make_trainer(tmp_path, *common, "--training.local_batch_size", "8")
    small = make_trainer(tmp_path, *common, "--training.local_batch_size", "2")
    assert (big.grad_accum_steps, small.grad_accum_steps) == (1, 4)
    g_big, g_small = grads_after(big), grads_after(small)
    for name, g in g_big.items():
        torch.testing.assert_close(g_small[name], g, atol=1e-6, rtol=0, msg=name)


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(
        ConfigError,
        match="training.global_batch_size: global batch 10 is not divisible by local_batch_size "
        "4 x data-parallel degree 1 = 4",
    ):
        make_trainer(
            tmp_path, "--training.local_batch_size", "4", "--training.global_batch_size", "10"
        )


@pytest.mark.heavy
def test_loss_falls_on_embedded_corpus(tmp_path):
    trainer = make_trainer(
        tmp_path, "--training.steps", "50", "--training.seq_len", "128", "--data.shuffle", "false",
        "--lr_scheduler.warmup_steps", "5", "--optimizer.lr", "3e-3",
    )  # fmt: skip
    losses = trainer.train()
    assert len(losses) == 50
    # logits start with unit variance (output std dim**-0.5 over unit-RMS features), so the
    # first loss is ln(2304) + 1/2 = 8.24 in expectation
    assert losses[0] == pytest.approx(8.24, abs=0.15)
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0


def test_same_seed_same_losses(tmp_path):
    args = ("--training.steps", "3", "--training.seq_len", "64", "--training.deterministic")
    a = make_trainer(tmp_path, *args).train()
    b = make_trainer(tmp_path, *args).train()
    c = make_trainer(tmp_path, *args, "--training.seed", "1").train()
    assert a == b and a != c


def test_non_finite_loss_stops_without_update(tmp_path):
    trainer = make_trainer(tmp_path, "--training.seq_len", "32")
    with torch.no_grad():
        trainer.model.layers["1"].feed_forward.w2.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="step 1: loss nan"):
        trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.nan_to_num(), before[name].nan_to_num()), name
    assert trainer.optimizer.state == {}  # the optimizer never stepped


def test_step_without_targets_changes_nothing(tmp_path):
    """A global batch whose labels are all ignored (finetuning data of prompts only) gives loss
    0 and zero gradients instead of dividing by zero, and no update."""
    trainer = make_trainer(tmp_path, "--training.seq_len", "16", "--training.local_batch_size", "2")
    inputs = torch.randint(0, 2000, (2, 16))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss = trainer.forward_backward([(inputs, torch.full_like(inputs, -100))])
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    # no update either: Adam's moments and weight decay would move the weights
    trainer.optimizer_step(loss)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_tokenizer_larger_than_vocab_is_rejected(tmp_path):
    with pytest.raises(
        ConfigError, match="the tokenizer has 2304 tokens but the model's vocabulary is 1000"
    ):
        make_trainer(tmp_path, "--model.vocab_size", "1000")


def test_main_reports_bad_config(capsys):
    # main() gives titan's logger a handler on the current stderr (capsys's): restore it after
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        code = main(["--job.config_file", DEBUG_TOML, "--training.stpes", "3"])
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    # one line: the bad key and the nearest valid one
    message = "unknown config key training.'stpes' (command line); did you mean 'steps'?"
    assert re.fullmatch(rf"\[titan\] [\d-]+ [\d:,]+ ERROR bad config: {re.escape(message)}\n", err)


def _run_train(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TITAN_PYTHON": sys.executable, "CONFIG_FILE": DEBUG_TOML, **env}
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", "--training.device=cpu"]
    return subprocess.run(
        [*cmd, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_run_train_sh_end_to_end(tmp_path):
    args = ("--training.steps", "3", "--training.seq_len", "64")
    out = _run_train(tmp_path, *args, "--job.print_config")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "model llama3 debugmodel: 5,704,960 parameters" in log
    # the printed config is the one written to the run folder (checked against the CLI below)
    assert "effective config:\n" + (tmp_path / "config.toml").read_text() in log
    # the script trains exactly what a Trainer built here trains (same config, same data)
    expected = make_trainer(tmp_path / "reference", *args).train()
    logged = re.findall(r"step: +(\d+) +loss: (\d+\.\d{6})", log)
    assert [int(step) for step, _ in logged] == [1, 2, 3], log[-3000:]
    # six printed decimals round by 5e-7; threads may sum fp32 in another order
    assert [float(loss) for _, loss in logged] == pytest.approx(expected, abs=2e-6, rel=0)
    again = load_config([], config_file=str(tmp_path / "config.toml"))
    again.job.config_file = DEBUG_TOML  # the rest of the written config is the run's
    cli = ["--job.dump_folder", str(tmp_path), "--training.device", "cpu", *args]
    assert again == load_config([*cli, "--job.print_config"], config_file=DEBUG_TOML)


def test_run_train_sh_bad_override(tmp_path):
    out = _run_train(tmp_path, "--optimizer.lrr", "1")
    assert out.returncode == 2
    assert "unknown config key optimizer.'lrr'" in out.stderr and "did you mean 'lr'?" in out.stderr
