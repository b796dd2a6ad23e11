"""Validation during training: the validation loss of every layout equals one process's, the
training run is the same with validation on or off, and bad validation settings stop start-up
with a message that names the fix."""

import pytest
import torch
from parallel_harness import assert_matches, make_batches, run_layouts, run_single

from titan.config import load_config
from titan.config.job_config import Validation
from titan.data.tokenizer import build_tokenizer
from titan.data.tokens import PackedWindows, TokenDocuments
from titan.errors import ConfigError, DataError
from titan.trainer.validate import Validator

# validation on the embedded corpus's held-out documents (real text: documents span windows)
VAL = ["--data.dataset", "default", "--data.holdout_every", "20", "--validation.enable", "true",
       "--validation.steps", "2", "--validation.freq", "2"]  # fmt: skip
ALONE = ["--parallelism.data_parallel_shard_degree", "1", "--training.local_batch_size", "4"]
TWO_RANKS = {
    "fsdp2": [*VAL, "--training.local_batch_size", "2"],
    "tp2": [*VAL, *ALONE, "--parallelism.tensor_parallel_degree", "2"],
    "cp2": [*VAL, *ALONE, "--parallelism.context_parallel_degree", "2"],
    "pp2": [*VAL, *ALONE, "--parallelism.pipeline_parallel_degree", "2"],
    "pp2_interleaved": [*VAL, *ALONE, "--parallelism.pipeline_parallel_degree", "2",
                        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                        "--parallelism.pipeline_parallel_layers_per_stage", "1"],
}  # fmt: skip


def test_validation_matches_one_process_and_leaves_training_alone():
    batches = make_batches(steps=4, global_batch=4)
    off = run_single(ALONE, batches)
    on = run_single([*VAL, *ALONE], batches)
    # validation runs forward only, on its own data: training is bit for bit the same
    assert on["losses"] == off["losses"] and on["norms"] == off["norms"]
    for key in ("grads", "params"):
        for name, t in off[key].items():
            assert torch.equal(on[key][name], t), f"{key} {name} changed by validation"
    steps = [step for step, _, _ in on["validation"]]
    assert steps == [2, 4], on["validation"]
    # 2 batches of 4 windows of 32 targets, and the loss moves as the model trains
    assert {n for _, _, n in on["validation"]} == {2 * 4 * 32}
    assert on["validation"][0][1] != on["validation"][1][1]
    results = run_layouts(2, list(TWO_RANKS.values()), batches)
    for name, got in zip(TWO_RANKS, results, strict=True):
        assert_matches(name, got, on)
        assert [(s, n) for s, _, n in got["validation"]] == [(s, n) for s, _, n in on["validation"]]
        for (step, loss, _), (_, ref, _) in zip(got["validation"], on["validation"], strict=True):
            assert abs(loss - ref) <= 1e-5, f"{name}: validation loss {loss} at step {step}, {ref}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--validation.enable"], "data.holdout_every = 0 holds nothing out: set "
                                  "--data.holdout_every N"),
        (["--validation.enable", "--data.dataset", "synthetic"], "'synthetic' has no documents"),
        (["--validation.enable", "--data.blend", "1 default"], "data.blend mixes several sources"),
        (["--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "0"],
         "validation.steps = 0: use a positive count or -1"),
        (["--validation.enable", "--validation.dataset", "synthetic", "--validation.freq", "0"],
         "validation.freq = 0 must be > 0"),
    ],
)  # fmt: skip
def test_bad_validation_settings_stop_start_up(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(["--job.config_file", "titan/train_configs/debug_model.toml", *args])
    assert message in str(e.value)


def test_validation_batches_must_fit_the_data():
    tokenizer = build_tokenizer("titan/assets/tokenizer/tokenizer.model")
    docs = TokenDocuments.from_texts("two documents", 2, ["a b c " * 40, "d e " * 30].__getitem__,
                                     tokenizer)  # fmt: skip
    windows = PackedWindows(docs, 16, seed=0, shuffle=False, infinite=False)
    n = windows.epoch_tokens // 17
    assert Validator(Validation(steps=-1), windows, n, 2, 0, 2).steps == n // 4
    with pytest.raises(DataError, match=rf"holds {n} windows .* not validation.steps = 99: lower"):
        Validator(Validation(steps=99), windows, n, 2, 0, 2)
    with pytest.raises(DataError, match="synthetic validation tokens never end: set validation"):
        Validator(Validation(steps=-1), windows, None, 2, 0, 2)
