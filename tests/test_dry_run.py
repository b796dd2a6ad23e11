"""Dry runs by tracing (COMM_MODE=fake_backend): the traced step allocates what the real step
allocates, its activations are what autograd saves, the stored sizes are exact counts, and a
config that does not fit, or bad traced ranks, stop with one line."""

import re
from pathlib import Path

import pytest
import torch
from dry_run_harness import dry_run

from titan.models.llama3 import FLAVORS
from titan.models.llama3.model import Transformer
from titan.trainer.memory_tracer import MemoryTracer, static_state

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING, BLOCK = 2304 * 256, 754_176  # debugmodel: 2 x embedding + norm + 6 blocks
TOTAL = 5_704_960


def test_trace_allocates_what_the_real_step_allocates(tmp_path):
    """The same step traced on fake tensors and on real ones (really computed, with the fake
    process group: FSDP 4 x TP 2, bf16 FSDP gathers, no AC): every part at the peak and every
    stored size agree to the byte."""
    args = ("--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "128")
    _, fake = dry_run(tmp_path / "fake", *args)
    _, real = dry_run(tmp_path / "real", *args, TITAN_DRY_RUN_REAL="1")
    (fake,), (real,) = fake["ranks"], real["ranks"]
    assert fake["peak"] == real["peak"]
    assert fake["held"] == real["held"]
    assert fake["peak"]["activations"] > 0 and fake["peak"]["gathered parameters"] > 0


def test_activations_are_what_autograd_saves():
    """After a forward (one process, bf16 autocast), the tracer's activations are exactly the
    storages autograd saved for backward plus the logits: counted by autograd's own hooks."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(FLAVORS["debugmodel"])
    model.to_empty(device="cpu")
    model.init_weights()
    tokens = torch.randint(0, 2304, (2, 128))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    # parameters, buffers (RoPE) and the input tokens were there before the forward
    before = [*model.parameters(), *model.buffers(), tokens]
    params = {t.untyped_storage()._cdata for t in before}
    tracer = MemoryTracer(model, static_state(model, torch.optim.SGD(model.parameters())))
    with tracer, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(tokens)
        activations = tracer.current["activations"]
    from_autograd = sum(n for key, n in saved.items() if key not in params)
    assert activations == from_autograd + logits.untyped_storage().nbytes()
    assert activations > 6 * 2 * 128 * 256 * 2  # at least each block's bf16 input


def _held_elements(estimate: dict) -> dict[str, float]:
    return {k: v / 4 for k, v in estimate["held"].items()}  # fp32 state


def test_fsdp_tp_sizes_are_exact_counts(tmp_path):
    """FSDP 4 x TP 2 at 8: rank 0 stores an eighth of the model (FSDP pads rows to 4), its
    gradients as much, and AdamW's two moments twice that."""
    log, out = dry_run(
        tmp_path, "--training.seq_len", "32", "--parallelism.tensor_parallel_degree", "2"
    )
    assert "parallel layout: dp_shard 4 x tp 2 over 8 ranks" in log
    (rank0,) = out["ranks"]
    held = _held_elements(rank0)
    assert TOTAL / 8 <= held["parameters"] <= TOTAL / 8 * 1.05, held
    assert held["gradients"] == held["parameters"]
    assert held["optimizer state"] == 2 * held["parameters"]
    assert rank0["peak"]["parameters"] == rank0["held"]["parameters"]
    assert rank0["total"] == sum(rank0["peak"].values())
    assert re.search(r"rank 0 \(rank 0; traced in [\d.]+ s\): peak [\d.]+ GiB", log)
    assert "fits: the highest peak (rank 0) is" in log


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_pipeline_traces_the_first_and_last_pipeline_rank(tmp_path, schedule):
    """PP 2 x FSDP 2 x TP 2: both pipeline ranks run the schedule on fake tensors; each holds
    its stages' parameters split 4 ways (with ZBV rank 0 holds the first and the last stage)."""
    log, out = dry_run(
        tmp_path, "--training.seq_len", "32", "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "2",
        "--parallelism.pipeline_parallel_schedule", schedule,
    )  # fmt: skip
    assert "parallel layout: pp 2 x dp_shard 2 x tp 2 over 8 ranks" in log
    first, last = out["ranks"]
    assert (first["label"], first["rank"], last["label"], last["rank"]) == (
        "pp rank 0", 0, "pp rank 1", 4,
    )  # fmt: skip
    held = {
        "1F1B": (EMBEDDING + 3 * BLOCK, EMBEDDING + 256 + 3 * BLOCK),
        "ZBVZeroBubble": (2 * EMBEDDING + 256 + 4 * BLOCK, 2 * BLOCK),
    }[schedule]
    for estimate, expected in zip((first, last), held, strict=True):
        elements = _held_elements(estimate)
        assert expected / 4 <= elements["parameters"] <= expected / 4 * 1.01, elements
        assert elements["optimizer state"] == 2 * elements["parameters"]
        assert estimate["peak"]["activations"] > 0  # the schedule ran


def test_a_config_that_does_not_fit_says_by_how_much(tmp_path):
    log, out = dry_run(tmp_path, "--dry_run.memory_gib", "0.01", rc=1)
    peak = out["ranks"][0]["total"] / 2**30
    line = f"DOES NOT FIT: rank 0 peaks at {peak:.2f} GiB, {peak - 0.01:.2f} GiB over the 0.01 GiB"
    assert line in log and out["fits"] is False


def test_traced_ranks_must_exist(tmp_path):
    log, _ = dry_run(tmp_path, "--dry_run.ranks", "9", rc=1)
    assert "dry_run.ranks = [9]: ranks are 0..7" in log


def test_ddp_is_refused_with_what_to_trace_instead(tmp_path):
    args = ["--parallelism.data_parallel_replicate_degree", "2"]
    log, _ = dry_run(tmp_path, *args, "--parallelism.data_parallel_shard_degree", "1", ngpu=2, rc=1)
    assert "a dry run cannot trace DDP (data_parallel_replicate_degree > 1 with " in log
    assert "dry-run an FSDP or HSDP layout instead" in log


def test_muon_state_and_gathered_matrices(tmp_path):
    """Muon at FSDP 4 x TP 2: rank 0 holds one momentum buffer per block matrix and AdamW's two
    moments for the rest (embedding and output an eighth each, norms a quarter: TP replicates
    them), exact; the traced optimizer step holds at least a gathered fp32 w1 (the largest
    matrix, 640 x 256, whole on every rank) and its bf16 Newton-Schulz copy."""
    log, out = dry_run(
        tmp_path, "--training.seq_len", "32", "--parallelism.tensor_parallel_degree", "2",
        "--optimizer.name", "Muon",
    )  # fmt: skip
    (rank0,) = out["ranks"]
    held = _held_elements(rank0)
    adamw_only = 2 * EMBEDDING / 8 + 256 / 4 + 6 * 2 * 256 / 4  # embedding, output, norms
    assert held["optimizer state"] == held["parameters"] + adamw_only
    w1 = 640 * 256
    assert rank0["optimizer_step"] >= w1 * 4 + w1 * 2, rank0["optimizer_step"]
    assert "optimizer step: 0.002 GiB above what it starts from" in log


def test_nvfp4_dry_run_traces_the_emulated_layers(tmp_path):
    """A dry run converts what the GPU run would (linears of multiples of 128, here without the
    kept end blocks: 5 of the 7 linears of blocks 1-4) and traces the emulated custom ops."""
    log, report = dry_run(tmp_path, "--model.converters", "nvfp4",
                          "--quantize.linear.first_last_blocks_hp", "1", ngpu=2)  # fmt: skip
    assert "nvfp4 (emulated): 20 of 43 linears" in log
    (rank,) = report["ranks"]
    assert rank["peak"]["activations"] > 0
