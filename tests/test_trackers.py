"""Trackers across restarts: a resumed job continues its W&B run and TensorBoard shows each step
once, with the values of the run that wrote it last. Offline: W&B in offline mode."""

import glob
import os
import re
import shutil

import pytest
import torch
import wandb
from test_metrics import _wandb_records, wandb_offline

from titan.config.job_config import Metrics
from titan.trainer.metrics import MetricsLogger
from titan.trainer.trackers import WANDB_ID_FILE, wandb_run_id

CPU = torch.device("cpu")


def _logger(cfg: Metrics, dump: str, start_step: int = 0, **kw) -> MetricsLogger:
    return MetricsLogger(
        cfg, dump, rank=0, device=CPU, flops_per_token=1, peak_flops=None, start_step=start_step,
        **kw,
    )  # fmt: skip


def _log(ml: MetricsLogger, step: int, loss: float) -> None:
    ml.log(step, loss=loss, grad_norm=1.0, lr=1e-3, ntokens=10, elapsed_s=1.0, data_s=0.0)


def test_tensorboard_resume_drops_the_repeated_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = Metrics(enable_tensorboard=True)
    first = _logger(cfg, str(tmp_path))
    for step in range(1, 6):  # the job dies after step 5; its last checkpoint is step 3
        _log(first, step, loss=float(step))
    first.close()
    resumed = _logger(cfg, str(tmp_path), start_step=3)
    for step in range(4, 7):
        _log(resumed, step, loss=10.0 + step)
    resumed.close()
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_wandb_run_id_file(tmp_path):
    assert wandb_run_id(str(tmp_path), 0, True, "abc123") == "abc123"
    assert (tmp_path / WANDB_ID_FILE).read_text() == "abc123\n"
    assert wandb_run_id(str(tmp_path), 0, True, "other") == "abc123"  # kept across restarts
    assert wandb_run_id(str(tmp_path), 2, False, "r2") == "r2"  # one run per rank
    assert wandb_run_id(str(tmp_path), 2, False, "again") == "r2"
    assert (tmp_path / f"{WANDB_ID_FILE}_rank2").read_text() == "r2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [WANDB_ID_FILE, f"{WANDB_ID_FILE}_rank2"]


def _offline_run(path: str):
    """(run id, display name, logged steps) of an offline run folder's .wandb file."""
    (file,) = glob.glob(os.path.join(path, "run-*.wandb"))
    records = _wandb_records(file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    return run.run_id, run.display_name, steps


def test_wandb_resume_continues_the_run(tmp_path, monkeypatch):
    wandb_offline(tmp_path, monkeypatch)
    dump = tmp_path / "llama3_8b_run7"
    cfg = Metrics(enable_wandb=True, wandb_project="titan-test")
    for start, steps in ((0, (1, 2)), (2, (3, 4))):  # a start, then a restart from step 2
        ml = _logger(cfg, str(dump), start_step=start)
        for step in steps:
            _log(ml, step, loss=1.0)
        ml.close()
        # finish() can return before wandb's service has written the run file: stop it
        wandb.teardown()
    run_id = (dump / WANDB_ID_FILE).read_text().strip()
    runs = sorted(glob.glob(str(dump / "wandb" / "offline-run-*")))
    # wandb names a run's folder offline-run-<time>-<id>, and adds -1 to a second one started
    # in the same second
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", r) for r in runs), runs
    # no job.description: the run is named after the dump folder
    assert [_offline_run(r) for r in runs] == [
        (run_id, "llama3_8b_run7", [1, 2]),
        (run_id, "llama3_8b_run7", [3, 4]),
    ]


@pytest.mark.parametrize("rank_0_only", [True, False])
def test_wandb_name_is_the_description(tmp_path, monkeypatch, rank_0_only):
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or _FakeRun(kw))
    cfg = Metrics(enable_wandb=True, rank_0_only=rank_0_only)
    _logger(cfg, str(tmp_path / "d"), run_name="8B fsdp")
    (kw,) = calls
    assert kw["name"] == ("8B fsdp" if rank_0_only else "8B fsdp-rank0")
    assert (
        kw["resume"] == "allow"
        and kw["id"] == (tmp_path / "d" / _id_file(rank_0_only)).read_text().strip()
    )


def _id_file(rank_0_only: bool) -> str:
    return WANDB_ID_FILE if rank_0_only else f"{WANDB_ID_FILE}_rank0"


class _FakeRun:
    def __init__(self, kw: dict):
        self.name, self.id = kw["name"], kw["id"]


def test_resumed_trainer_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import make_trainer

    def train(steps: int) -> int:
        trainer = make_trainer(
            tmp_path, "--training.steps", str(steps), "--training.local_batch_size", "2",
            "--training.seq_len", "64", "--metrics.log_freq", "1",
            "--metrics.enable_tensorboard", "true", "--checkpoint.enable", "true",
            "--checkpoint.interval", "2", "--checkpoint.last_save_model_only", "false",
        )  # fmt: skip
        start = trainer.step
        trainer.train()
        return start

    assert train(4) == 0
    shutil.rmtree(tmp_path / "checkpoint" / "step-4")  # the job died before saving step 4
    assert train(5) == 2  # resumes at step 2 and trains 3, 4 and 5 again
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5]
