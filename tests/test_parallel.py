"""Each parallel layout against one process: same seed, same global batch, same losses and grads.

Layouts run in fork-started CPU/gloo processes (tests/parallel_harness.py), many per launch.
Every layout starts from the one-process run's weights (titan initializes a parallel CPU run as
one process would), so loss, gradient norm and every gradient must agree to fp32 rounding.
"""

import pytest
import torch
from parallel_harness import BASE, DEBUG_TOML, make_batches, run_layouts, run_single

from titan.config import load_config
from titan.models.llama3.hf_io import save_hf_checkpoint
from titan.train import Trainer, main

STEPS, GLOBAL_BATCH = 3, 4
TOL = 1e-5  # fp32, max abs difference (losses ~8, gradients ~1e-3)

FSDP = ["--training.local_batch_size", "2"]  # dp_shard fills the world: 2
DDP = [*FSDP, "--parallelism.data_parallel_replicate_degree", "2",
       "--parallelism.data_parallel_shard_degree", "1"]  # fmt: skip
TP = ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]
FULL_AC = ["--activation_checkpoint.mode", "full"]
OP_AC = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
         "op"]  # fmt: skip
LAYER_AC = ["--activation_checkpoint.mode", "selective",
            "--activation_checkpoint.selective_ac_option", "2"]  # fmt: skip
COMPILE = ["--compile.enable", "true"]

TWO_RANKS = {
    "fsdp": FSDP,
    "fsdp_reshard_always": [*FSDP, "--parallelism.fsdp_reshard_after_forward", "always"],
    "fsdp_reshard_never": [*FSDP, "--parallelism.fsdp_reshard_after_forward", "never"],
    "fsdp_full_ac": [*FSDP, *FULL_AC],
    "fsdp_op_ac": [*FSDP, *OP_AC],
    "fsdp_layer_ac": [*FSDP, *LAYER_AC],
    # two micro-batches of 1 per rank: accumulation and data parallel together
    "fsdp_grad_accum": ["--training.local_batch_size", "1", "--training.global_batch_size", "4"],
    "ddp": DDP,
    "ddp_full_ac": [*DDP, *FULL_AC],
    "tp_sp_loss_parallel": TP,
    "tp_no_sp": [*TP, "--parallelism.enable_sequence_parallel", "false"],
    "tp_no_loss_parallel": [*TP, "--parallelism.disable_loss_parallel", "true"],
    "tp_no_sp_no_loss_parallel": [
        *TP,
        "--parallelism.enable_sequence_parallel",
        "false",
        "--parallelism.disable_loss_parallel",
        "true",
    ],  # fmt: skip
    "tp_full_ac": [*TP, *FULL_AC],
    "tp_op_ac": [*TP, *OP_AC],
}
FSDP_TP = ["--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"]
FOUR_RANKS = {
    "hsdp_2x2": [
        "--training.local_batch_size",
        "1",
        "--parallelism.data_parallel_replicate_degree",
        "2",
    ],  # fmt: skip
    "fsdp_4": ["--training.local_batch_size", "1"],
    "fsdp2_tp2": FSDP_TP,
    "fsdp2_tp2_full_ac": [*FSDP_TP, *FULL_AC],
    "fsdp2_tp2_op_ac": [*FSDP_TP, *OP_AC],
    "fsdp2_tp2_no_sp": [*FSDP_TP, "--parallelism.enable_sequence_parallel", "false"],
}
COMPILED = {
    "fsdp_compile": [*FSDP, *COMPILE],
    "fsdp_compile_op_ac": [*FSDP, *COMPILE, *OP_AC],
    "fsdp_compile_full_ac": [*FSDP, *COMPILE, *FULL_AC],
    "tp_compile": [*TP, *COMPILE],
}
COMPILED_FOUR = {
    "fsdp2_tp2_compile": [*FSDP_TP, *COMPILE],
    "fsdp2_tp2_compile_op_ac": [*FSDP_TP, *COMPILE, *OP_AC],
}


@pytest.fixture(scope="module")
def batches() -> torch.Tensor:
    return make_batches(STEPS, GLOBAL_BATCH)


@pytest.fixture(scope="module")
def reference(batches) -> dict:
    return run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches)


def assert_matches(name: str, got: dict, ref: dict) -> None:
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=TOL, rtol=0,
        msg=lambda m: f"{name}: losses differ from one process\n{m}",
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(got["norms"]), torch.tensor(ref["norms"]), atol=TOL, rtol=0,
        msg=lambda m: f"{name}: gradient norms differ\n{m}",
    )  # fmt: skip
    assert sorted(got["grads"]) == sorted(ref["grads"]), f"{name}: parameter names differ"
    for key, grad in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][key], grad, atol=TOL, rtol=0,
            msg=lambda m, key=key: f"{name}: gradient of {key} differs\n{m}",
        )  # fmt: skip


def _check_all(cases: dict, world_size: int, batches, reference) -> None:
    results = run_layouts(world_size, list(cases.values()), batches)
    for name, got in zip(cases, results, strict=True):
        assert_matches(name, got, reference)


def test_two_rank_layouts_match_one_process(batches, reference):
    _check_all(TWO_RANKS, 2, batches, reference)


def test_four_rank_layouts_match_one_process(batches, reference):
    _check_all(FOUR_RANKS, 4, batches, reference)


def test_compiled_layouts_match_one_process(batches, reference):
    # Includes TP x compile, where the embedding's pending-collective output would lose its
    # gradient entering a compiled block without titan's guard (see tensor_parallel.py).
    _check_all(COMPILED, 2, batches, reference)
    _check_all(COMPILED_FOUR, 4, batches, reference)


def test_reference_is_sensitive(batches, reference):
    """The comparison can fail: other batches give other losses and gradients."""
    other_batches = make_batches(STEPS, GLOBAL_BATCH, seed=2)
    other = run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], other_batches)
    with pytest.raises(AssertionError):
        assert_matches("shuffled", other, reference)


def test_resume_chain_across_layouts(tmp_path):
    """One run, resumed after every step under another layout: FSDP 2 -> TP 2 -> DDP 2 -> one
    process -> FSDP 2 x TP 2 -> HSDP 2x2 -> FSDP 4. Each leg loads the previous leg's checkpoint
    (weights, Adam moments, LR schedule, step; async saves from several processes) and must give
    the uninterrupted run's losses and, at the end, its weights."""
    steps = 7
    batches = make_batches(steps, GLOBAL_BATCH)
    reference = run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches)
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "1",
            "--job.dump_folder", str(tmp_path)]  # fmt: skip
    async_ckpt = [*ckpt, "--checkpoint.async_mode", "async"]
    legs = [
        ("fsdp2", 2, FSDP),
        ("tp2", 2, TP),
        ("ddp2", 2, DDP),
        ("one process", 1, ["--training.local_batch_size", str(GLOBAL_BATCH)]),
        ("fsdp2 x tp2", 4, FSDP_TP),
        ("hsdp 2x2", 4, FOUR_RANKS["hsdp_2x2"]),
        ("fsdp4", 4, FOUR_RANKS["fsdp_4"]),
    ]
    results = []
    for world_size in (2, 1, 4):  # one launch per world size, its legs one after the other
        # multi-process legs save asynchronously, the one process synchronously
        saving = ckpt if world_size == 1 else async_ckpt
        cases = [
            ([*args, *saving], i + 1) for i, (_, n, args) in enumerate(legs) if n == world_size
        ]
        if world_size == 1:
            results += [run_single(args, batches, stop) for args, stop in cases]
        else:
            results += run_layouts(world_size, cases, batches)
    for i, ((name, _, _), got) in enumerate(zip(legs, results, strict=True)):
        assert got["start"] == i, f"{name}: resumed at step {got['start']}, not {i}"
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(reference["losses"][i : i + 1]), atol=TOL,
            rtol=0, msg=lambda m, name=name: f"{name}: loss after resuming differs\n{m}",
        )  # fmt: skip
    # the last leg's weights after all seven steps: the uninterrupted run's
    for key, param in reference["params"].items():
        torch.testing.assert_close(results[-1]["params"][key], param, atol=TOL, rtol=0)


def test_seed_and_hf_weights_start_every_layout_alike(tmp_path, batches):
    """Weights written by one process (seed 7), as a seed checkpoint and as a Hugging Face
    folder, give FSDP 2 and TP 2 runs (seed 0) the one-process seed-7 run's losses."""
    seed_dump, hf_dir = tmp_path / "seed", tmp_path / "hf"
    seed_7 = ["--job.config_file", DEBUG_TOML, *BASE, "--training.seed", "7"]
    assert main([*seed_7, "--job.dump_folder", str(seed_dump),
                 "--checkpoint.create_seed_checkpoint"]) == 0  # fmt: skip
    source = Trainer(load_config(seed_7))
    save_hf_checkpoint(source.model.state_dict(), source.model_args, hf_dir, dtype=torch.float32)
    reference = run_single(
        ["--training.local_batch_size", str(GLOBAL_BATCH), "--training.seed", "7"], batches
    )
    from_seed = ["--checkpoint.enable", "true", "--checkpoint.interval", "100",
                 "--job.dump_folder", str(seed_dump)]  # fmt: skip
    from_hf = ["--checkpoint.initial_load_path", str(hf_dir), "--checkpoint.initial_load_in_hf"]
    cases = {
        "fsdp2 from the seed checkpoint": [*FSDP, *from_seed],
        "tp2 from the seed checkpoint": [*TP, *from_seed],
        "fsdp2 from HF safetensors": [*FSDP, *from_hf],
        "tp2 from HF safetensors": [*TP, *from_hf],
    }
    results = run_layouts(2, list(cases.values()), batches)
    for name, got in zip(cases, results, strict=True):
        assert got["start"] == 0, name
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(reference["losses"]), atol=TOL, rtol=0,
            msg=lambda m, name=name: f"{name}: losses differ\n{m}",
        )  # fmt: skip
