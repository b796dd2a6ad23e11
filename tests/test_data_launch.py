"""From the command line, as a user checks it: the same config and seed train on the same data
whatever the layout. On the debug config with synthetic tokens, the embedded corpus and a
preprocessed dataset, FSDP 2 (local batch 2), HSDP 2x2 (local batch 1) and one process with 2
accumulation steps log the losses of one process with local batch 4; a run saved at dp 2
resumes at dp 1 and at dp 4 on the uninterrupted run's losses."""

import json
import re
import shutil

import pytest
from parallel_harness import load_script
from test_parallel_launch import DEBUG_TOML, _run

from titan.components.dataloader import load_embedded_corpus

ARGS = ["--training.seq_len", "64", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1"]
ONE = ["--training.local_batch_size", "4"]
FSDP2 = ["--training.local_batch_size", "2"]
HSDP = ["--training.local_batch_size", "1", "--parallelism.data_parallel_replicate_degree", "2"]
ACCUM = ["--training.local_batch_size", "2", "--training.global_batch_size", "4"]


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


# source: the layouts checked against its one-process run (NGPU, overrides)
CASES = {
    "synthetic": [("4", HSDP)],
    "default": [("1", ACCUM)],
    "preprocessed": [("2", FSDP2)],
}


@pytest.mark.parametrize("source", list(CASES))
def test_layouts_log_the_losses_of_one_process(tmp_path, preprocessed, source):
    data = {"synthetic": ["--data.dataset", "synthetic"], "default": [],
            "preprocessed": preprocessed}[source]  # fmt: skip
    steps = ["--training.steps", "3"]
    reference = _losses(_run(tmp_path / "one", DEBUG_TOML, *ARGS, *steps, *data, *ONE), range(1, 4))
    for ngpu, layout in CASES[source]:
        log = _run(tmp_path / ngpu, DEBUG_TOML, *ARGS, *steps, *data, *layout, NGPU=ngpu)
        assert "global sample order" in log
        # fp32 sums over other rank and micro-batch splits: rounding, far below 1e-4
        assert _losses(log, range(1, 4)) == pytest.approx(reference, abs=1e-4, rel=0), (
            source,
            layout,
        )


def test_resume_at_another_data_parallel_degree(tmp_path):
    """Saved after 3 steps of FSDP 2, resumed for 3 more at dp 1 (local batch 4) and at dp 4
    (local batch 1): the uninterrupted one-process run's losses, the data position included."""
    steps = ["--training.steps", "6"]
    whole = _losses(_run(tmp_path / "whole", DEBUG_TOML, *ARGS, *steps, *ONE), range(1, 7))
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3",
            "--checkpoint.last_save_model_only", "false"]  # fmt: skip
    saved = tmp_path / "saved"
    _run(saved, DEBUG_TOML, *ARGS, *ckpt, "--training.steps", "3", *FSDP2, NGPU="2")
    for ngpu, layout in (("1", ONE), ("4", ["--training.local_batch_size", "1"])):
        dump = tmp_path / f"resumed_{ngpu}"
        shutil.copytree(saved / "checkpoint", dump / "checkpoint")
        log = _run(dump, DEBUG_TOML, *ARGS, *ckpt, *steps, *layout, NGPU=ngpu)
        assert "checkpoint: resumed from" in log and "no data position" not in log
        resumed = _losses(log, range(4, 7))
        assert resumed == pytest.approx(whole[3:], abs=1e-4, rel=0), ngpu
