"""[resilience]'s anomaly policy on the debug model, in this process: a transient fault is told
from a deterministic one by replaying the step, and a deterministic one does what on_anomaly
says (stop, skip, rollback and skip the next batches, recorded so a resume skips them too).
Faults are made with titan.faults (corrupt_grad: one rank's gradients, once; poison_window: the
loss of the step that reads a given global window)."""

import json
import logging
import math

import pytest
import torch
from test_train import DEBUG_TOML

from titan import faults
from titan.config import load_config
from titan.config.job_config import Resilience
from titan.errors import AnomalyError, NonFiniteLossError
from titan.logger import logger
from titan.trainer.anomaly import SKIPS_FILE, AnomalyGuard
from titan.trainer.trainer import Trainer

SMALL = [
    "--training.device", "cpu", "--training.seq_len", "32", "--training.local_batch_size", "2",
    "--metrics.log_freq", "1000", "--lr_scheduler.warmup_steps", "2",
]  # fmt: skip
# local batch 2, one process: step s reads global windows 2(s - 1) and 2s - 1; window 4 is step 3's
STEP3_WINDOW = 4


@pytest.fixture(autouse=True)
def no_faults():
    yield
    faults.configure("")


@pytest.fixture
def log_lines(monkeypatch):
    """What titan's logger writes (it does not propagate to pytest's caplog)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def train(tmp_path, *args: str, fault: str = "") -> tuple[Trainer, list[float]]:
    faults.configure(fault)
    cfg = load_config(["--job.dump_folder", str(tmp_path), *SMALL, *args], DEBUG_TOML)
    trainer = Trainer(cfg)
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> list[float]:
    return train(tmp_path_factory.mktemp("clean"), "--training.steps", "6")[1]


@pytest.mark.parametrize(
    "fault, args",
    [
        ("corrupt_grad@3/0=nan", []),  # non-finite: always tested
        (
            "corrupt_grad@3/0=1e4",
            ["--resilience.grad_norm_spike_factor", "10", "--resilience.spike_window", "2"],
        ),  # fmt: skip
    ],
    ids=["nan", "norm-spike"],
)
def test_transient_fault_is_replayed_and_training_goes_on_unchanged(
    tmp_path, clean, log_lines, fault, args
):
    _, losses = train(tmp_path, "--training.steps", "6", *args, fault=fault)
    assert losses == clean  # exactly: the replayed step is the step without the fault
    found = [line for line in log_lines if "transient fault" in line]
    assert len(found) == 1 and found[0].startswith("step 3: transient fault")
    assert "gradients differed on rank(s) [0]" in found[0], found[0]


def test_poisoned_batch_stops_after_a_replay_that_gives_the_same(tmp_path, log_lines):
    with pytest.raises(NonFiniteLossError) as e:
        train(tmp_path, "--training.steps", "6", fault=f"poison_window@{STEP3_WINDOW}")
    message = str(e.value)
    assert message.startswith("step 3: loss nan, grad norm nan; the update was not applied")
    assert "a replay gave the same result: the data or the numerics" in message
    assert "set resilience.on_anomaly to 'skip' or 'rollback'" in message
    assert any(line.startswith("step 3: non-finite") and "replaying" in line for line in log_lines)


def test_poisoned_batch_without_replay_stops_at_once(tmp_path, log_lines):
    with pytest.raises(NonFiniteLossError, match="step 3: loss nan"):
        train(tmp_path, "--training.steps", "6", "--resilience.replay", "false",
              fault=f"poison_window@{STEP3_WINDOW}")  # fmt: skip
    assert not any("replaying" in line for line in log_lines)


def test_skip_leaves_the_weights_and_moves_the_schedule_and_data_on(tmp_path, clean, log_lines):
    trainer, losses = train(tmp_path / "skip", "--training.steps", "3",
                            "--resilience.on_anomaly", "skip",
                            fault=f"poison_window@{STEP3_WINDOW}")  # fmt: skip
    assert losses[:2] == clean[:2] and math.isnan(losses[2])
    two, _ = train(tmp_path / "two", "--training.steps", "2")
    for (name, p), q in zip(trainer.model.named_parameters(), two.model.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} was updated by the skipped step"
    assert trainer.lr_scheduler.last_epoch == 3 and trainer.dataloader.consumed == 6
    assert any("step 3: loss nan" in line and "action: skip" in line for line in log_lines)


def test_loss_spike_is_detected_and_skipped(tmp_path, clean, log_lines):
    _, losses = train(tmp_path, "--training.steps", "4", "--resilience.spike_sigma", "6",
                      "--resilience.spike_window", "2", "--resilience.on_anomaly", "skip",
                      fault=f"poison_window@{STEP3_WINDOW}=10")  # fmt: skip
    assert losses[:2] == clean[:2] and losses[2] == pytest.approx(10 * clean[2], rel=1e-5)
    spike = [line for line in log_lines if "loss spike" in line and "action: skip" in line]
    assert len(spike) == 1 and spike[0].startswith("step 3: loss"), log_lines


ROLLBACK = [
    "--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "2",
    "--resilience.on_anomaly", "rollback", "--resilience.rollback_skip_batches", "2",
]  # fmt: skip


def test_rollback_skips_batches_and_a_resume_skips_the_same(tmp_path, clean, log_lines):
    run, losses = train(tmp_path, *ROLLBACK, fault=f"poison_window@{STEP3_WINDOW}")
    # steps 1-2 as the clean run; step 3 failed, rolled back to step 2, and the data skipped 2
    # global batches: steps 3-6 read the batches of steps 5-8
    assert len(losses) == 6 and losses[:2] == clean[:2] and all(map(math.isfinite, losses))
    assert run.dataloader.consumed == 2 * (6 + 2)
    folder = tmp_path / "checkpoint"
    record = json.loads((folder / SKIPS_FILE).read_text())
    assert [(e["after_step"], e["batches"], e["at_step"]) for e in record] == [(2, 2, 3)]
    assert any(line.startswith("step 3: rolled back to the checkpoint of step 2")
               for line in log_lines)  # fmt: skip
    # A resume from step 2 (the newer checkpoints gone) skips the same windows: same losses,
    # and the poisoned window is never read again.
    for step in (4, 6):
        for p in sorted((folder / f"step-{step}").iterdir()):
            p.unlink()
        (folder / f"step-{step}").rmdir()
    resumed, again = train(tmp_path, *ROLLBACK, fault=f"poison_window@{STEP3_WINDOW}")
    assert again == losses[2:]
    assert resumed.dataloader.consumed == run.dataloader.consumed
    assert json.loads((folder / SKIPS_FILE).read_text()) == record  # nothing new recorded


def test_rollback_resume_restores_the_spike_history(tmp_path):
    args = ["--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "2",
            "--resilience.spike_sigma", "6"]  # fmt: skip
    first, _ = train(tmp_path, *args, "--checkpoint.last_save_model_only", "false")
    resumed = Trainer(load_config(["--job.dump_folder", str(tmp_path), *SMALL, *args],
                                  DEBUG_TOML))  # fmt: skip
    assert resumed.step == 2 and len(first.guard.history) == 2
    assert list(resumed.guard.history) == list(first.guard.history)


def test_rollback_before_any_checkpoint_stops_with_the_fix(tmp_path):
    with pytest.raises(AnomalyError, match="no checkpoint was saved yet .checkpoint.interval = 5"):
        train(tmp_path, *ROLLBACK, "--checkpoint.interval", "5",
              fault=f"poison_window@{STEP3_WINDOW}")  # fmt: skip


def test_guard_thresholds():
    guard = AnomalyGuard(Resilience(spike_sigma=3, grad_norm_spike_factor=4, spike_window=4),
                         rank=0, device=torch.device("cpu"))  # fmt: skip
    assert guard.anomaly(float("inf"), 1.0) == "non-finite"
    assert guard.anomaly(1.0, float("nan")) == "non-finite"
    assert guard.anomaly(100.0, 100.0) is None  # no history yet: nothing to compare with
    guard.history.extend([(2.0, 1.0), (2.2, 1.0), (1.8, 1.0), (2.0, 1.0)])  # std 0.1414
    assert guard.anomaly(2.4, 3.9) is None
    assert guard.anomaly(2.5, 1.0).startswith("loss spike (2.500000 > mean 2.000000 + 3 x std")
    assert guard.anomaly(2.0, 4.1).startswith("grad norm spike (4.1 > 4 x mean 1")


def test_fault_specs():
    assert faults.parse("sleep@*/1=0.2, raise@3/1") == [
        faults.Fault("sleep", None, 1, 0.2), faults.Fault("raise", 3, 1, None),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="'explode@3' is not kind@step"):
        faults.parse("explode@3")


@pytest.mark.heavy
@pytest.mark.parametrize(
    "layout, reference",
    [
        (["--parallelism.data_parallel_shard_degree", "2"], ["--training.local_batch_size", "4"]),
        (["--parallelism.pipeline_parallel_degree", "2"], []),
    ],
    ids=["fsdp2", "pp2"],
)
def test_two_ranks_name_the_faulty_rank_and_keep_the_losses(tmp_path, layout, reference):
    """run_train.sh with 2 ranks, rank 1's gradients poisoned once in step 2: the replay names
    rank 1 (on rank 0's log) and the run logs the losses of one fault-free process."""
    from test_launch import SMALL as LAUNCH
    from test_launch import _losses, _train

    log = _train(tmp_path / "two", *LAUNCH, *layout, NGPU="2",
                 TITAN_FAULT_INJECTION="corrupt_grad@2/1=nan")  # fmt: skip
    assert "step 2: transient fault" in log and "differed on rank(s) [1]" in log, log[-3000:]
    one = _losses(_train(tmp_path / "one", *LAUNCH, *reference, NGPU="1"))
    two = _losses(log)
    assert sorted(two) == [1, 2, 3] and all(abs(two[s] - one[s]) <= 2e-6 for s in one), (one, two)
