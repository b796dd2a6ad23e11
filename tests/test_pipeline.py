"""Pipeline parallel against one process: every schedule, the CSV schedule, PP x FSDP, PP x TP,
PP x FSDP x TP (3D), PP x HSDP,
accumulation, activation checkpointing and compile give the one-process losses and every
gradient (tests/parallel_harness.py); the split, the stage placement and each start-up error.
"""

import dataclasses
import re

import pytest
import torch
from layout_expect import Expect, check_cases, fsdp, fsdp_tp
from parallel_harness import (
    COUNTING_BACKEND,
    ignore_some_labels,
    make_batches,
    run_single,
)

from titan.config import load_config
from titan.config.job_config import Parallelism
from titan.config.manager import _CHOICES
from titan.errors import ConfigError
from titan.models.llama3 import FLAVORS
from titan.models.llama3.pipeline import split_module_names
from titan.parallelisms.pipeline import SCHEDULES, check_pipeline, rank_stages, stage_log

STEPS, GLOBAL_BATCH = 3, 4
DEBUG = FLAVORS["debugmodel"]  # 6 blocks

PP = ["--parallelism.pipeline_parallel_degree", "2"]
ALONE = [*PP, "--parallelism.data_parallel_shard_degree", "1", "--training.local_batch_size", "4"]
SCHEDULE = "--parallelism.pipeline_parallel_schedule"
ONE_BLOCK_EACH = ["--parallelism.pipeline_parallel_layers_per_stage", "1"]  # 6 stages
ONE = {0: [0], 1: [1]}
LOOPED_3 = {0: [0, 2, 4], 1: [1, 3, 5]}
V = {0: [0, 3], 1: [1, 2]}
# a compute-only CSV for 2 ranks, one stage each, backward split into input (I) and weight (W)
# gradients: rank 1 runs each micro-batch's forward, loss and backward before the next
SPLIT_BACKWARD_CSV = [
    "0F0,0F1,0F2,0F3,0I0,0W0,0I1,0W1,0I2,0W2,0I3,0W3",
    "1F0,1I0,1W0,1F1,1I1,1W1,1F2,1I2,1W2,1F3,1I3,1W3",
]
EXPLICIT_4 = "tok_embeddings layers.0,layers.1 layers.2,layers.3 layers.4,layers.5 norm output"


def pp(stages=ONE, layout="pp 2", **kw) -> Expect:
    return Expect(layout, stages=stages, **kw)


@pytest.fixture(scope="module")
def batches() -> tuple[torch.Tensor, torch.Tensor]:
    return ignore_some_labels(make_batches(STEPS, GLOBAL_BATCH))


@pytest.fixture(scope="module")
def reference(batches) -> dict:
    return run_single(["--training.local_batch_size", str(GLOBAL_BATCH)], batches)


@pytest.mark.heavy
def test_every_schedule_matches_one_process(batches, reference, tmp_path):
    csv = tmp_path / "split_backward.csv"
    csv.write_text("\n".join(SPLIT_BACKWARD_CSV) + "\n")
    cases = {
        "GPipe": ([*ALONE, SCHEDULE, "GPipe"], pp()),
        "1F1B": ([*ALONE, SCHEDULE, "1F1B"], pp()),
        "Interleaved1F1B, 3 stages per rank": (
            [*ALONE, SCHEDULE, "Interleaved1F1B", *ONE_BLOCK_EACH],
            pp(LOOPED_3),
        ),
        "LoopedBFS, explicit 4-stage split": (
            [
                *ALONE,
                SCHEDULE,
                "LoopedBFS",
                "--parallelism.pipeline_parallel_module_names_per_stage",
                EXPLICIT_4,
            ],
            pp({0: [0, 2], 1: [1, 3]}),
        ),  # fmt: skip
        "InterleavedZeroBubble": (
            [*ALONE, SCHEDULE, "InterleavedZeroBubble", *ONE_BLOCK_EACH],
            pp(LOOPED_3),
        ),
        "ZBVZeroBubble": ([*ALONE, SCHEDULE, "ZBVZeroBubble"], pp(V)),
        "DualPipeV": ([*ALONE, SCHEDULE, "DualPipeV"], pp(V)),
        "CSV with split backward": (
            [*ALONE, "--parallelism.pipeline_parallel_schedule_csv", str(csv)],
            pp(),
        ),
        "1F1B, full AC": ([*ALONE, "--activation_checkpoint.mode", "full"], pp(ac_blocks=3)),
        "1F1B, first stage 2 blocks fewer": (
            [*ALONE, "--parallelism.pipeline_parallel_first_stage_less_layers", "2"],
            pp(),
        ),
        "1F1B, compiled": (
            [*ALONE, "--compile.enable", "true", "--compile.backend", COUNTING_BACKEND],
            pp(compiled=True),
        ),
    }
    check_cases(cases, 2, batches, reference)


@pytest.mark.heavy
def test_pipeline_composes_with_fsdp_and_tp(batches, reference):
    fsdp_pp = dict(layout="pp 2 x dp_shard 2", stages=ONE)
    cases = {
        "pp 2 x fsdp 2, 1F1B": ([*PP, "--training.local_batch_size", "2"], fsdp(**fsdp_pp)),
        "pp 2 x fsdp 2, two micro-batches of 1 accumulated": (
            [
                *PP,
                "--training.local_batch_size",
                "1",
                "--training.global_batch_size",
                "4",
                SCHEDULE,
                "GPipe",
            ],
            fsdp(**fsdp_pp),
        ),  # fmt: skip
        "pp 2 x fsdp 2, ZBVZeroBubble": (
            [*PP, "--training.local_batch_size", "2", SCHEDULE, "ZBVZeroBubble"],
            fsdp(**{**fsdp_pp, "stages": V}),
        ),
        "pp 2 x tp 2, Interleaved1F1B": (
            [
                *ALONE,
                "--parallelism.tensor_parallel_degree",
                "2",
                SCHEDULE,
                "Interleaved1F1B",
                *ONE_BLOCK_EACH,
            ],
            dataclasses.replace(fsdp_tp("pp 2 x tp 2", stages=LOOPED_3), dp=None),
        ),  # fmt: skip
        "pp 4, 1F1B": (
            ["--parallelism.pipeline_parallel_degree", "4", "--training.local_batch_size", "4"],
            pp({0: [0], 1: [1], 2: [2], 3: [3]}, layout="pp 4"),
        ),
    }
    check_cases(cases, 4, batches, reference)


@pytest.mark.heavy
def test_pipeline_in_3d_and_with_hsdp(batches, reference):
    """Eight ranks: PP 2 x FSDP 2 x TP 2, and PP 2 x HSDP 2x2 (a micro-batch per rank)."""
    hsdp_mesh = ("dp_replicate", "dp_shard")
    cases = {
        "pp 2 x fsdp 2 x tp 2, 1F1B": (
            [*PP, "--parallelism.tensor_parallel_degree", "2", "--training.local_batch_size", "2"],
            fsdp_tp("pp 2 x dp_shard 2 x tp 2", stages=ONE),
        ),
        "pp 2 x hsdp 2x2, GPipe": (
            [
                *PP,
                "--parallelism.data_parallel_replicate_degree",
                "2",
                "--training.local_batch_size",
                "1",
                SCHEDULE,
                "GPipe",
            ],
            fsdp("pp 2 x dp_replicate 2 x dp_shard 2", fsdp_mesh=hsdp_mesh, stages=ONE),
        ),  # fmt: skip
    }
    check_cases(cases, 8, batches, reference)


@pytest.mark.heavy
def test_grad_reduce_per_microbatch_matches_one_process(batches, reference):
    """PP 2 x FSDP 2 with pipeline_parallel_grad_reduce: each stage's gradients reduce-scattered
    after every micro-batch (sharded accumulation) or once after the stage's last backward, under
    1F1B (one stage per rank), Interleaved1F1B (three per rank, each with its own last backward)
    and GPipe with two steps' micro-batches accumulated."""
    fsdp_pp = dict(layout="pp 2 x dp_shard 2", stages=ONE)
    per_mb = ["--parallelism.pipeline_parallel_grad_reduce", "microbatch"]
    two = [*PP, "--training.local_batch_size", "2"]
    interleaved = [*two, SCHEDULE, "Interleaved1F1B"]
    accumulated = [*PP, "--training.local_batch_size", "1", "--training.global_batch_size", "4"]
    cases = {
        "1F1B, per micro-batch": ([*two, *per_mb], fsdp(**fsdp_pp)),
        "Interleaved1F1B, per stage": (
            [*interleaved, *ONE_BLOCK_EACH], fsdp(**{**fsdp_pp, "stages": LOOPED_3}),
        ),
        "Interleaved1F1B, per micro-batch": (
            [*interleaved, *ONE_BLOCK_EACH, *per_mb], fsdp(**{**fsdp_pp, "stages": LOOPED_3}),
        ),
        "GPipe accumulated, per micro-batch, reshard always": (
            [*accumulated, SCHEDULE, "GPipe", *per_mb,
             "--parallelism.fsdp_reshard_after_forward", "always"],
            fsdp(**fsdp_pp, reshard="always"),
        ),
    }  # fmt: skip
    check_cases(cases, 4, batches, reference)


@pytest.mark.heavy
def test_grad_reduce_per_microbatch_with_hsdp_and_in_3d():
    """Eight ranks, gradients reduce-scattered per micro-batch: PP 2 x HSDP 2x2 (two
    micro-batches per rank, all-reduced across the replicas each time) and PP 2 x FSDP 2 x TP 2
    (four micro-batches) match one process."""
    batches = ignore_some_labels(make_batches(2, 8))
    reference = run_single(["--training.local_batch_size", "8"], batches)
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2"]
    per_mb = ["--parallelism.pipeline_parallel_grad_reduce", "microbatch"]
    expect = fsdp(
        "pp 2 x dp_replicate 2 x dp_shard 2", fsdp_mesh=("dp_replicate", "dp_shard"), stages=ONE
    )
    three_d = [*PP, "--parallelism.tensor_parallel_degree", "2"]
    cases = {
        "pp 2 x hsdp 2x2, 1F1B, per micro-batch": (
            [*PP, *hsdp, "--training.local_batch_size", "2", *per_mb], expect,
        ),
        "pp 2 x fsdp 2 x tp 2, 1F1B, per micro-batch": (
            [*three_d, "--training.local_batch_size", "4", *per_mb],
            fsdp_tp("pp 2 x dp_shard 2 x tp 2", stages=ONE),
        ),
    }  # fmt: skip
    check_cases(cases, 8, batches, reference)


@pytest.mark.parametrize("when", ["stage", "microbatch"])
def test_grad_reduce_in_the_dry_run(tmp_path, when):
    """PP 2 x FSDP 2, four micro-batches, traced: each rank's stage reduce-scatters its fp32
    gradients once a step per FSDP unit (three blocks and the root), or once per unit and
    micro-batch; per micro-batch the rank holds only sharded gradients at its peak."""
    from dry_run_harness import dry_run

    args = ["--training.seq_len", "32", "--training.local_batch_size", "4"]
    args += [*PP, "--parallelism.pipeline_parallel_grad_reduce", when]
    log, out = dry_run(tmp_path, *args, ngpu=4)
    first, last = out["ranks"]
    per_step = 4 if when == "stage" else 4 * 4
    embedding, block = 2304 * 256, 754_176  # debugmodel
    for rank, params in ((first, embedding + 3 * block), (last, embedding + 256 + 3 * block)):
        assert rank["reduce_scatters"] == per_step, rank
        assert rank["reduce_scatter_bytes"] == per_step // 4 * 4 * params, rank
        sharded = rank["held"]["gradients"]
        if when == "stage":
            assert rank["peak"]["gradients"] > 1.5 * sharded, rank
        else:
            assert rank["peak"]["gradients"] == sharded, rank
    assert f"FSDP gradient reduce-scatters: {per_step} a step" in log


def test_split_and_placement():
    p = Parallelism(pipeline_parallel_degree=2, pipeline_parallel_layers_per_stage=2)
    names = split_module_names(DEBUG, p, 3)
    assert names == [
        ["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3"],
        ["layers.4", "layers.5", "norm", "output"],
    ]  # fmt: skip
    less = dataclasses.replace(
        p, pipeline_parallel_first_stage_less_layers=1, pipeline_parallel_last_stage_less_layers=1
    )
    assert [len(s) for s in split_module_names(DEBUG, less, 2)] == [4, 5]  # 3 + embedding, ...
    uneven = split_module_names(FLAVORS["405B"], p, 16)  # 126 blocks: 7 or 8 per stage
    assert {len([n for n in s if n.startswith("layers.")]) for s in uneven} == {7, 8}
    v = Parallelism(pipeline_parallel_degree=4, pipeline_parallel_schedule="DualPipeV")
    assert rank_stages(v, 8) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    looped = Parallelism(pipeline_parallel_degree=4, pipeline_parallel_schedule="LoopedBFS")
    assert rank_stages(looped, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    log = stage_log([[0, 2], [1]], names)
    assert log.splitlines() == [
        "  pp rank 0: stage 0 [tok_embeddings, layers.0-1]; stage 2 [layers.4-5, norm, output]",
        "  pp rank 1: stage 1 [layers.2-3]",
    ]
    assert set(SCHEDULES) == set(_CHOICES["parallelism.pipeline_parallel_schedule"])


def _pp(**kw) -> Parallelism:
    return Parallelism(pipeline_parallel_degree=kw.pop("pp", 2), **kw)


@pytest.mark.parametrize(
    "cfg, local_batch, message",
    [
        (
            _pp(pipeline_parallel_microbatch_size=3),
            4,
            "local_batch_size 4 is not divisible by "
            "parallelism.pipeline_parallel_microbatch_size 3",
        ),
        (_pp(pp=8), 8, "8 pipeline stages but the model has 6 blocks"),
        (
            _pp(pipeline_parallel_layers_per_stage=1),
            8,
            "schedule 1F1B runs one stage per rank, but the split gives 6 stages",
        ),
        (
            _pp(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=2),
            8,
            "3 stages do not divide over pipeline_parallel_degree 2",
        ),
        (
            _pp(pipeline_parallel_schedule="ZBVZeroBubble", pipeline_parallel_layers_per_stage=1),
            8,
            "needs exactly two stages per rank \\(4 stages",
        ),
        (_pp(), 1, "schedule 1F1B needs at least as many micro-batches as stages \\(2\\)"),
        (
            _pp(pipeline_parallel_schedule="DualPipeV"),
            2,
            "DualPipeV needs at least as many micro-batches as stages \\(4\\)",
        ),
        (
            _pp(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=1),
            5,
            "5 micro-batches is not a multiple of 2 rounds",
        ),
        (
            _pp(pipeline_parallel_schedule="ZBVZeroBubble", fsdp_reshard_after_forward="always"),
            4,
            "computes weight gradients after the input gradients.*use 'default' or 'never'",
        ),
        (
            _pp(
                pipeline_parallel_schedule="ZBVZeroBubble",
                pipeline_parallel_grad_reduce="microbatch",
            ),
            4,
            "FSDP can reduce-scatter a micro-batch's gradients only after a whole backward: set "
            "pipeline_parallel_grad_reduce = 'stage'",
        ),
        (
            _pp(pipeline_parallel_schedule_csv="/nonexistent.csv"),
            4,
            "pipeline_parallel_schedule_csv = '/nonexistent.csv': no such file",
        ),
    ],  # fmt: skip
)
def test_pipeline_constraints_are_named(cfg, local_batch, message):
    with pytest.raises(ValueError, match=message):
        check_pipeline(cfg, DEBUG.n_layers, local_batch)


@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"])
def test_zero_bubble_with_compile_is_refused(schedule):
    # measured: torch 2.13's input-gradient pass fails on compiled blocks (ZBV, DualPipeV)
    cfg = _pp(pipeline_parallel_schedule=schedule)
    with pytest.raises(ValueError, match="cannot do through compiled blocks"):
        check_pipeline(cfg, DEBUG.n_layers, 4, compile_blocks=True)
    check_pipeline(_pp(), DEBUG.n_layers, 4, compile_blocks=True)  # 1F1B compiles


def test_bad_csv_and_explicit_splits_are_named(tmp_path):
    csv = tmp_path / "three_rows.csv"
    csv.write_text("\n".join([*SPLIT_BACKWARD_CSV, "1F0"]) + "\n")
    with pytest.raises(ValueError, match="has 3 rows but pipeline_parallel_degree is 2"):
        check_pipeline(_pp(pipeline_parallel_schedule_csv=str(csv)), 6, 4)
    csv.write_text("0F0,0X0\n1F0\n")
    with pytest.raises(ValueError, match="three_rows.csv', row 1: Invalid action string: 0X0"):
        check_pipeline(_pp(pipeline_parallel_schedule_csv=str(csv)), 6, 4)
    names = "tok_embeddings layers.0 layers.1 layers.2,layers.4 layers.3 layers.5 norm output"
    p = _pp(pipeline_parallel_module_names_per_stage=names.split(","))
    with pytest.raises(ValueError, match="exactly once, in model order"):
        split_module_names(DEBUG, p, 2)
    short = _pp(pipeline_parallel_module_names_per_stage=["tok_embeddings layers.0", "norm output"])
    with pytest.raises(ValueError, match=re.escape("leaves out ['layers.1', 'layers.2'")):
        split_module_names(DEBUG, short, 2)


@pytest.mark.parametrize(
    "args, world, message",
    [
        (
            [SCHEDULE, "interleaved_1f1b"],
            1,
            "pipeline_parallel_schedule = 'interleaved_1f1b' is not one of .* did you mean "
            "'Interleaved1F1B'",
        ),
        (
            [*PP, "--model.flavor", "1B", "--model.vocab_size", "2304"],
            2,
            "pipeline parallel with tied embeddings",
        ),
        (
            [
                *PP,
                "--parallelism.data_parallel_replicate_degree",
                "2",
                "--parallelism.data_parallel_shard_degree",
                "1",
            ],
            4,
            "pipeline parallel with DDP",
        ),
        ([*PP, "--training.local_batch_size", "1"], 2, "needs at least as many micro-batches"),
        (
            ["--parallelism.pipeline_parallel_grad_reduce", "micro_batch"],
            1,
            "pipeline_parallel_grad_reduce = 'micro_batch' is not one of stage, microbatch; did "
            "you mean 'microbatch'",
        ),
    ],  # fmt: skip
)
def test_trainer_stops_before_starting_processes(monkeypatch, args, world, message):
    """Each is refused at start-up, before any process group (one process plays rank 0)."""
    from parallel_harness import DEBUG_TOML

    from titan.trainer.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(["--job.config_file", DEBUG_TOML, "--training.device", "cpu", *args]))
