"""Each parallel layout against one process: same seed, same global batch, same losses and grads.

Layouts run in fork-started CPU/gloo processes (tests/parallel_harness.py), many per launch.
Every layout starts from the one-process run's weights (titan initializes a parallel CPU run as
one process would), so loss, gradient norm and every gradient must agree to fp32 rounding, each
gradient relative to its own scale. The batches ignore a different number of labels in every row
(some rows none are kept), so micro-batches and ranks count different numbers of targets. Each
case also checks what was applied: meshes, every parameter's placement, FSDP resharding, the
sequence-parallel and loss-parallel activations, activation checkpointing and compiled blocks.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from layout_expect import Expect, check_cases, fsdp, fsdp_tp, tp
from parallel_harness import (
    BASE,
    COUNTING_BACKEND,
    DEBUG_TOML,
    LOSS_ATOL,
    assert_matches,
    assert_tensor_matches,
    ignore_some_labels,
    load_script,
    make_batches,
    run_layouts,
    run_single,
)

from titan.config import load_config
from titan.models.llama3 import FLAVORS
from titan.models.llama3.hf_io import save_hf_checkpoint, titan_state_dict_from_hf
from titan.train import main
from titan.trainer.loss import IGNORE_INDEX
from titan.trainer.trainer import Trainer

STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 4, 32
TOL = LOSS_ATOL  # losses (~8), fp32

FSDP = ["--training.local_batch_size", "2"]  # dp_shard fills the world: 2
DDP = [*FSDP, "--parallelism.data_parallel_replicate_degree", "2",
       "--parallelism.data_parallel_shard_degree", "1"]  # fmt: skip
TP = ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]
NO_SP = ["--parallelism.enable_sequence_parallel", "false"]
NO_LP = ["--parallelism.disable_loss_parallel", "true"]
FULL_AC = ["--activation_checkpoint.mode", "full"]
OP_AC = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
         "op"]  # fmt: skip
LAYER_AC = ["--activation_checkpoint.mode", "selective",
            "--activation_checkpoint.selective_ac_option", "2"]  # fmt: skip
# inductor, counting the compiled graphs that run (parallel_harness.COUNTING_BACKEND)
COMPILE = ["--compile.enable", "true", "--compile.backend", COUNTING_BACKEND]
FSDP_TP = ["--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
PP2_ALONE = [*PP2, "--parallelism.data_parallel_shard_degree", "1",
             "--training.local_batch_size", "4"]  # fmt: skip
ZBV = ["--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"]
INTERLEAVED_3 = ["--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                 "--parallelism.pipeline_parallel_layers_per_stage", "1"]  # fmt: skip
HSDP = ["--training.local_batch_size", "1", "--parallelism.data_parallel_replicate_degree", "2"]


TWO_RANKS = {
    "fsdp": (FSDP, fsdp()),
    "fsdp_reshard_always": ([*FSDP, "--parallelism.fsdp_reshard_after_forward", "always"],
                            fsdp(reshard="always")),
    "fsdp_reshard_never": ([*FSDP, "--parallelism.fsdp_reshard_after_forward", "never"],
                           fsdp(reshard="never")),
    "fsdp_full_ac": ([*FSDP, *FULL_AC], fsdp(ac_blocks=6)),
    "fsdp_op_ac": ([*FSDP, *OP_AC], fsdp(ac_blocks=6)),
    "fsdp_layer_ac": ([*FSDP, *LAYER_AC], fsdp(ac_blocks=3)),
    # two micro-batches of 1 per rank: accumulation and data parallel together
    "fsdp_grad_accum": (["--training.local_batch_size", "1", "--training.global_batch_size", "4"],
                        fsdp()),
    "ddp": (DDP, Expect("dp_replicate 2", dp="ddp")),
    "ddp_full_ac": ([*DDP, *FULL_AC], Expect("dp_replicate 2", dp="ddp", ac_blocks=6)),
    "tp_sp_loss_parallel": (TP, tp()),
    "tp_no_sp": ([*TP, *NO_SP], tp(sp=False)),
    "tp_no_loss_parallel": ([*TP, *NO_LP], tp(lp=False)),
    "tp_no_sp_no_loss_parallel": ([*TP, *NO_SP, *NO_LP], tp(sp=False, lp=False)),
    "tp_full_ac": ([*TP, *FULL_AC], tp(ac_blocks=6)),
    "tp_op_ac": ([*TP, *OP_AC], tp(ac_blocks=6)),
}  # fmt: skip
FOUR_RANKS = {
    "hsdp_2x2": (HSDP, fsdp("dp_replicate 2 x dp_shard 2", fsdp_mesh=("dp_replicate", "dp_shard"))),
    "fsdp_4": (["--training.local_batch_size", "1"], fsdp("dp_shard 4")),
    "fsdp2_tp2": (FSDP_TP, fsdp_tp()),
    "fsdp2_tp2_full_ac": ([*FSDP_TP, *FULL_AC], fsdp_tp(ac_blocks=6)),
    "fsdp2_tp2_op_ac": ([*FSDP_TP, *OP_AC], fsdp_tp(ac_blocks=6)),
    "fsdp2_tp2_no_sp": ([*FSDP_TP, *NO_SP], fsdp_tp(sp=False)),
}
COMPILED = {
    "fsdp_compile": ([*FSDP, *COMPILE], fsdp(compiled=True)),
    "fsdp_compile_op_ac": ([*FSDP, *COMPILE, *OP_AC], fsdp(compiled=True, ac_blocks=6)),
    "fsdp_compile_full_ac": ([*FSDP, *COMPILE, *FULL_AC], fsdp(compiled=True, ac_blocks=6)),
    "tp_compile": ([*TP, *COMPILE], tp(compiled=True)),
}
COMPILED_FOUR = {
    "fsdp2_tp2_compile": ([*FSDP_TP, *COMPILE], fsdp_tp(compiled=True)),
    "fsdp2_tp2_compile_op_ac": ([*FSDP_TP, *COMPILE, *OP_AC], fsdp_tp(compiled=True, ac_blocks=6)),
}


@pytest.fixture(scope="module")
def batches() -> tuple[torch.Tensor, torch.Tensor]:
    return ignore_some_labels(make_batches(STEPS, GLOBAL_BATCH, SEQ_LEN))


@pytest.fixture(scope="module")
def reference(batches) -> dict:
    return run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches)


def test_two_rank_layouts_match_one_process(batches, reference):
    check_cases(TWO_RANKS, 2, batches, reference)


def test_four_rank_layouts_match_one_process(batches, reference):
    check_cases(FOUR_RANKS, 4, batches, reference)


@pytest.mark.heavy
def test_compiled_layouts_match_one_process(batches, reference):
    # Includes TP x compile, where the embedding's pending-collective output would lose its
    # gradient entering a compiled block without titan's guard (see tensor_parallel.py).
    check_cases(COMPILED, 2, batches, reference)
    check_cases(COMPILED_FOUR, 4, batches, reference)


def test_loss_is_one_cross_entropy_over_the_joined_batch(batches, reference):
    """titan's loss (token sums over micro-batches / the step's global target count) is the
    mean cross-entropy of the whole batch with its ignored labels: one process with four
    micro-batches of different target counts (one with none) and one big batch both give
    F.cross_entropy's loss and gradients, each gradient relative to its own scale."""
    inputs, labels = batches
    assert (labels[0] != IGNORE_INDEX).sum(-1).unique().numel() == GLOBAL_BATCH  # all differ
    assert (labels[0, 0] == IGNORE_INDEX).all()
    trainer = Trainer(load_config(["--job.config_file", DEBUG_TOML, *BASE]))
    loss = F.cross_entropy(
        trainer.model(inputs[0]).flatten(0, 1), labels[0].flatten(), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    expected = {n: p.grad for n, p in trainer.model.named_parameters()}
    accumulated = run_single(
        ["--training.local_batch_size", "1", "--training.global_batch_size", str(GLOBAL_BATCH)],
        batches, stop=1,
    )  # fmt: skip
    for name, got in (("one batch", reference), ("four micro-batches", accumulated)):
        assert got["losses"][0] == pytest.approx(loss.item(), abs=TOL), name
        for key, grad in expected.items():
            assert_tensor_matches(f"{name}: gradient of {key}", got["grads"][key], grad)


def test_comparison_catches_a_one_percent_error(reference):
    """The comparison can fail: any one gradient 1% off, a loss 2e-5 off, or a gradient norm
    0.01% off fails it; so does a single element of the smallest-scale gradient at 2x."""
    for key in reference["grads"]:
        broken = copy.deepcopy(reference)
        broken["grads"][key] *= 1.01
        with pytest.raises(AssertionError, match=f"gradient of {key}"):
            assert_matches("broken", broken, reference)
    smallest = min(reference["grads"], key=lambda k: reference["grads"][k].abs().max())
    broken = copy.deepcopy(reference)
    flat = broken["grads"][smallest].view(-1)
    flat[flat.abs().argmax()] *= 2
    with pytest.raises(AssertionError, match=f"gradient of {smallest}"):
        assert_matches("broken", broken, reference)
    for field, delta in (("losses", 2e-5), ("norms", 1e-4 * reference["norms"][-1])):
        broken = copy.deepcopy(reference)
        broken[field][-1] += delta
        with pytest.raises(AssertionError):
            assert_matches("broken", broken, reference)


@pytest.mark.heavy
def test_resume_chain_across_layouts(tmp_path):
    """One run, resumed after every step under another layout: FSDP 2 -> TP 2 -> DDP 2 -> PP 2
    (Interleaved1F1B, 3 stages per rank) -> one process -> FSDP 2 x TP 2 -> HSDP 2x2 -> FSDP 4
    -> PP 2 x FSDP 2 (ZBVZeroBubble). Each leg loads the previous leg's checkpoint (weights,
    Adam moments, LR schedule, step; async saves from several processes) and must give the
    uninterrupted run's losses and, at the end, its weights."""
    steps = 9
    batches = make_batches(steps, GLOBAL_BATCH)
    reference = run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches)
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "1",
            "--job.dump_folder", str(tmp_path)]  # fmt: skip
    async_ckpt = [*ckpt, "--checkpoint.async_mode", "async"]
    legs = [
        ("fsdp2", 2, FSDP),
        ("tp2", 2, TP),
        ("ddp2", 2, DDP),
        ("pp2 interleaved", 2, [*PP2_ALONE, *INTERLEAVED_3]),
        ("one process", 1, ["--training.local_batch_size", str(GLOBAL_BATCH)]),
        ("fsdp2 x tp2", 4, FSDP_TP),
        ("hsdp 2x2", 4, HSDP),
        ("fsdp4", 4, ["--training.local_batch_size", "1"]),
        ("pp2 x fsdp2 zbv", 4, [*PP2, "--training.local_batch_size", "2", *ZBV]),
    ]  # fmt: skip
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
    # the last leg's weights after all nine steps: the uninterrupted run's
    for key, param in reference["params"].items():
        torch.testing.assert_close(results[-1]["params"][key], param, atol=TOL, rtol=0)
    # the pipelined leg's checkpoint (step 4) converts to Hugging Face like any other: its
    # weights are the uninterrupted run's after four steps
    after_4 = run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches, stop=4)
    hf = tmp_path / "hf_from_pp"
    step_4 = str(tmp_path / "checkpoint" / "step-4")
    convert_to_hf = load_script("convert_to_hf")
    assert (
        convert_to_hf.main([step_4, str(hf), "--flavor", "debugmodel", "--dtype", "float32"]) == 0
    )
    converted = titan_state_dict_from_hf(hf, FLAVORS["debugmodel"])
    assert converted.keys() == after_4["params"].keys()
    for key, param in after_4["params"].items():
        torch.testing.assert_close(converted[key], param, atol=TOL, rtol=0, msg=key)


@pytest.mark.heavy
def test_seed_and_hf_weights_start_every_layout_alike(tmp_path, batches):
    """Weights written by one process (seed 7), as a seed checkpoint and as a Hugging Face
    folder, give FSDP 2, TP 2 and PP 2 runs (seed 0) the one-process seed-7 run's losses."""
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
        "pp2 from the seed checkpoint": [*PP2_ALONE, *from_seed],
        "pp2 (V, two stages per rank) from HF safetensors": [*PP2_ALONE, *ZBV, *from_hf],
    }
    results = run_layouts(2, list(cases.values()), batches)
    for name, got in zip(cases, results, strict=True):
        assert got["start"] == 0, name
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(reference["losses"]), atol=TOL, rtol=0,
            msg=lambda m, name=name: f"{name}: losses differ\n{m}",
        )  # fmt: skip
