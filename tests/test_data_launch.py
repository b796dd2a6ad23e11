"""From the command line, as a user checks it: the same config and seed train on the same data
whatever the layout. On the debug config with a preprocessed dataset, FSDP 2 (local batch 2)
logs the losses of one process with local batch 4 (with the embedded corpus:
test_parallel_launch's dp_shard2; every source and layout in process: test_data.py); a run
saved at dp 2 resumes at dp 1 and at dp 4 on the uninterrupted run's losses."""

import json
import re
import shutil

import pytest
from parallel_harness import load_script
from test_parallel_launch import DEBUG_TOML, _run

from titan.data.dataloader import load_embedded_corpus

ARGS = ["--training.seq_len", "64", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1"]
ONE = ["--training.local_batch_size", "4"]
FSDP2 = ["--training.local_batch_size", "2"]


def _losses(log: str, steps: range) -> list[float]:
    """The losses the metrics lines log for `steps`, which must be exactly the steps logged."""
    found = re.findall(r"step: +(\d+) +loss: (\d+\.\d{6})", log)
    assert [int(s) for s, _ in found] == list(steps), log[-3000:]
    return [float(loss) for _, loss in found]


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> list[str]:
    """--data.path of the first 60 corpus documents preprocessed by scripts/preprocess_data.py."""
    folder = tmp_path_factory.mktemp("preprocessed")
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in load_embedded_corpus()[:60]))
    load_script("preprocess_data").main(
        [str(docs), "--output-prefix", str(folder / "docs"), "--workers", "1", "--quiet"]
    )
    return ["--data.path", str(folder / "docs")]


def test_fsdp_on_preprocessed_data_logs_the_losses_of_one_process(tmp_path, preprocessed):
    steps = ["--training.steps", "3"]
    one = _run(tmp_path / "one", DEBUG_TOML, *ARGS, *steps, *preprocessed, *ONE)
    log = _run(tmp_path / "fsdp", DEBUG_TOML, *ARGS, *steps, *preprocessed, *FSDP2, NGPU="2")
    assert "global sample order" in log and "parallel layout: dp_shard 2 over 2 ranks" in log
    # fp32 sums over another split of the batch: rounding, far below 1e-4
    got, reference = _losses(log, range(1, 4)), _losses(one, range(1, 4))
    assert got == pytest.approx(reference, abs=1e-4, rel=0)


@pytest.mark.heavy
def test_resume_at_another_data_parallel_degree(tmp_path):
    """Saved at step 3 of 6 under FSDP 2, resumed at dp 1 (local batch 4) and at dp 4 (local
    batch 1): the uninterrupted one-process run's losses, the data position included."""
    steps = ["--training.steps", "6"]
    whole = _losses(_run(tmp_path / "whole", DEBUG_TOML, *ARGS, *steps, *ONE), range(1, 7))
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3", "--checkpoint.load_step", "3"]
    saved = tmp_path / "saved"
    # the same 6-step run (LR schedule included) at dp 2, resumed from its step-3 checkpoint
    _run(saved, DEBUG_TOML, *ARGS, "--checkpoint.enable", "--checkpoint.interval", "3", *steps,
         *FSDP2, NGPU="2")  # fmt: skip
    for ngpu, layout in (("1", ONE), ("4", ["--training.local_batch_size", "1"])):
        dump = tmp_path / f"resumed_{ngpu}"
        shutil.copytree(saved / "checkpoint" / "step-3", dump / "checkpoint" / "step-3")
        log = _run(dump, DEBUG_TOML, *ARGS, *ckpt, *steps, *layout, NGPU=ngpu)
        assert "checkpoint: resumed from" in log and "no data position" not in log
        resumed = _losses(log, range(4, 7))
        assert resumed == pytest.approx(whole[3:], abs=1e-4, rel=0), ngpu
