"""What each parity case must have applied, checked against the harness's layout report.

`Expect` names a case's layout (data parallel wrapper, FSDP mesh and resharding, tensor, sequence
and loss parallel, activation checkpointing, compile, pipeline stages); `check_layout` compares
it with what tests/parallel_harness.py saw in the model: every parameter's placement, the FSDP
units, the final norm's output and the logits, wrapped and compiled blocks, stage placement.
`check_cases` runs many cases in one launch and checks each layout and its parity.
"""

import dataclasses

from parallel_harness import assert_matches, run_layouts

SEQ_LEN, VOCAB = 32, 2304


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a case must have applied (checked by check_layout against the harness's report)."""

    layout: str  # ParallelDims.describe()
    dp: str | None = None  # "fsdp" (also HSDP), "ddp"
    fsdp_mesh: tuple[str, ...] = ("dp_shard_cp",)
    reshard: str = "default"  # parallelism.fsdp_reshard_after_forward, with FSDP
    tp: bool = False
    sp: bool = False  # sequence parallel
    lp: bool = False  # loss parallel
    ac_blocks: int = 0  # blocks wrapped for activation checkpointing
    compiled: bool = False
    stages: dict[int, list[int]] | None = None  # pipeline rank -> its stage indices
    cp: int = 1  # context parallel: each rank holds 1/cp of every sequence


def fsdp(layout="dp_shard 2", **kw) -> Expect:
    return Expect(layout, dp="fsdp", **kw)


def tp(layout="tp 2", sp=True, lp=True, **kw) -> Expect:
    return Expect(layout, tp=True, sp=sp, lp=lp, **kw)


def fsdp_tp(layout="dp_shard 2 x tp 2", sp=True, **kw) -> Expect:
    return Expect(layout, dp="fsdp", tp=True, sp=sp, lp=True, **kw)


# tensor-parallel placement of each parameter, by its name's last parts (Megatron-style plan)
_ROWWISE = ("attention.wo.weight", "feed_forward.w2.weight")
_REPLICATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight")


def _expected_placement(name: str, e: Expect) -> tuple | None:
    """(mesh dim names, placements) that parameter `name` must have under layout `e`."""
    dims, places = [], []
    tp_place = None
    if e.tp:
        tp_place = (
            "R" if name.endswith(_REPLICATED) else "S(1)" if name.endswith(_ROWWISE) else "S(0)"
        )
    if e.dp == "fsdp":
        dims += e.fsdp_mesh
        places += ["R"] * (len(e.fsdp_mesh) - 1)
        places.append("S(0)")  # FSDP shards dim 0 (after TP's shard, if TP shards it too)
    if e.tp:
        dims.append("tp")
        places.append(tp_place)
    return (tuple(dims), tuple(places)) if dims else None


def check_layout(name: str, got: dict, e: Expect) -> None:
    """The case applied what its config asks for, seen in the model, not only in the numbers."""
    n = got["n_layers"]
    assert got["layout"] == e.layout, f"{name}: layout {got['layout']!r}, expected {e.layout!r}"
    assert got["data_parallel"] == e.dp, f"{name}: data parallel {got['data_parallel']}"
    for param, placement in got["placements"].items():
        expected = _expected_placement(param, e)
        assert placement == expected, f"{name}: {param} is placed {placement}, not {expected}"
    got_reshard = got["reshard_after_forward"]
    if e.stages is not None:
        assert got["stages"] == e.stages, f"{name}: pipeline stages {got['stages']}"
        # FSDP under a pipeline keeps every unit gathered unless asked to reshard ("always")
        blocks = {f"layers.{i}" for i in range(n)} if e.dp == "fsdp" else set()
        assert blocks <= set(got_reshard), f"{name}: FSDP units {sorted(got_reshard)}"
        expected = {e.reshard == "always"} if e.dp == "fsdp" else set()
        assert set(got_reshard.values()) == expected, f"{name}: resharding {got_reshard}"
    else:
        reshard = {}
        if e.dp == "fsdp":
            blocks = {"default": True, "always": True, "never": False}[e.reshard]
            reshard = {f"layers.{i}": blocks for i in range(n)}
            # "default" keeps the last block gathered for backward; the root reshards "always"
            reshard[f"layers.{n - 1}"] = e.reshard == "always"
            reshard["root"] = e.reshard == "always"
        assert got_reshard == reshard, f"{name}: FSDP units resharding after forward: {got_reshard}"
    norm_out, logits = got["activations"]["norm_out"], got["activations"]["logits"]
    tp_size = 2 if e.tp else 1
    # sequence parallel: the final norm's output is a sequence shard
    seq = (SEQ_LEN // e.cp) // (tp_size if e.sp else 1)
    assert norm_out["placement"] == ((("tp",), ("S(1)",)) if e.sp else None), (
        f"{name}: norm output {norm_out}"
    )
    assert norm_out["local_shape"][1] == seq, f"{name}: norm output {norm_out}"
    # loss parallel: the logits stay sharded on the vocabulary into the loss
    assert got["loss_parallel"] == e.lp, f"{name}: loss_parallel {got['loss_parallel']}"
    assert logits["placement"] == ((("tp",), ("S(2)",)) if e.lp else None), (
        f"{name}: logits {logits}"
    )
    assert logits["local_shape"][2] == VOCAB // (tp_size if e.lp else 1), f"{name}: logits {logits}"
    ac = got["checkpointed_blocks"]
    assert ac == e.ac_blocks, f"{name}: {ac} blocks checkpointed, not {e.ac_blocks}"
    got_runs = got["graph_runs_per_micro_batch"]
    if e.stages is not None:
        # each pipeline rank's blocks ran compiled at least once per pipeline micro-batch (and
        # once more in the stage's shape inference), or not at all
        per_block = got["graph_runs_per_block_and_pipeline_micro_batch"]
        assert len(per_block) == len(e.stages), f"{name}: {per_block}"
        ok = (
            all(r >= 1 for r in per_block.values())
            if e.compiled
            else set(per_block.values()) == {0}
        )
        assert ok, f"{name}: compiled graph runs per block and micro-batch by rank: {per_block}"
    else:
        # compiled: every block's graph and the loss's ran once per micro-batch
        runs = n + 1 if e.compiled else 0
        assert got_runs == runs, (
            f"{name}: {got_runs} compiled graphs ran per micro-batch, not {runs}"
        )


def check_cases(cases: dict, world_size: int, batches, reference: dict) -> None:
    """Run {name: (overrides, Expect)} in one launch of world_size processes; each case must
    have applied its layout and match the one-process reference."""
    results = run_layouts(world_size, [args for args, _ in cases.values()], batches)
    for (name, (_, expect)), got in zip(cases.items(), results, strict=True):
        check_layout(name, got["layout"], expect)
        assert_matches(name, got, reference)
