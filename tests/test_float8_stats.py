"""float8 debugging statistics: the recorded amax, scale, saturated and underflow fractions match a
float64 computation written from the float8 formats' definitions; records come only on armed steps
and from the first micro-batch; the JSONL file and the summary line; numerics are untouched; under
tensor parallelism (2 gloo processes) the records describe whole tensors and reach rank 0."""

import dataclasses
import json
import logging
import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.config import CastConfig, ScalingType
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

from titan.config.job_config import ActivationCheckpoint
from titan.converters.float8_stats import OPERANDS, Float8Stats
from titan.logger import logger
from titan.models.llama3 import FLAVORS, Transformer
from titan.parallelisms.activation_checkpoint import apply_ac
from titan.trainer.loss import cross_entropy_sum

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# The formats: largest finite value (e4m3fn 1.75 * 2^8; e5m2 1.75 * 2^15), the midpoint between it
# and the next step up (2^8 * 1.875 = 480, beyond e4m3fn's range; 2^16, e5m2's inf), above which
# round-to-nearest cannot give the largest value, so only the clamp to +-max keeps it; and the
# smallest subnormal (e4m3fn: 3 mantissa bits, min exponent -6 -> 2^-9; e5m2: 2 mantissa bits,
# min exponent -14 -> 2^-16), at most half of which round-to-nearest gives 0.
FORMAT_MAX = {E4M3: 448.0, E5M2: 57344.0}
CLAMP_ABOVE = {E4M3: 464.0, E5M2: 61440.0}
SMALLEST_SUBNORMAL = {E4M3: 2.0**-9, E5M2: 2.0**-16}
# What each recipe does, written out here rather than read from torchao's config:
# (dtype of input, weight, grad_output), per-row scales, scales rounded down to a power of 2.
RECIPES = {
    "tensorwise": ((E4M3, E4M3, E5M2), False, False),
    "rowwise": ((E4M3, E4M3, E4M3), True, True),
}
IN, OUT, BS, SEQ = 64, 32, 4, 8
SMALL = dataclasses.replace(FLAVORS["debugmodel"], n_layers=2, max_seq_len=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only spins against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def float8_config(recipe: str, **changes) -> Float8LinearConfig:
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True, **changes)


def reference(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, power_of_2: bool) -> dict:
    """Stats of a dynamic float8 cast of x (2-D: rows scaled separately when rowwise), in float64:
    scale = max finite / amax; x * scale saturates when only the clamp to +-max brings it into
    range (or it is not finite) and underflows when non-zero x lands within half a smallest
    subnormal of 0."""
    x = x.double()
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().max()
    scale = (FORMAT_MAX[dtype] / amax.clamp(min=1e-12)).float().double()  # torchao keeps fp32
    if power_of_2:
        scale = 2.0 ** torch.floor(torch.log2(scale))
    y = (x * scale).float().double()  # the exact product, rounded to fp32 as torchao's is
    saturated = ~(y.abs() <= CLAMP_ABOVE[dtype])
    underflow = (x != 0) & (y.abs() <= SMALLEST_SUBNORMAL[dtype] / 2)
    out = {"dtype": str(dtype).removeprefix("torch."), "amax": x.abs().max().item()}
    out |= {"scale_min": scale.min().item(), "scale_max": scale.max().item()}
    return out | {"saturated": saturated.double().mean().item(), "numel": x.numel(),
                  "underflow": underflow.double().mean().item()}  # fmt: skip


def operands(scenario: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input (BS, SEQ, IN), weight (OUT, IN), grad_output (BS, SEQ, OUT): rows of different
    magnitudes (so per-row scales differ from per-column ones), some exact zeros (which do not
    underflow), plus either values that flush to zero in float8 ("tiny") or one infinity ("inf",
    in row 2)."""
    g = torch.Generator().manual_seed(0)
    rows = BS * SEQ
    x = torch.randn(rows, IN, generator=g) * torch.linspace(0.1, 30, rows)[:, None]
    w = torch.randn(OUT, IN, generator=g) * torch.linspace(0.01, 1, OUT)[:, None]
    go = torch.randn(rows, OUT, generator=g) * torch.linspace(1e-3, 1, rows)[:, None]
    for t in (x, w, go):
        t[1::4, -7:] = 0
        if scenario == "tiny":  # 1e-11 relative to the largest row: below any float8 subnormal
            t[::3, :5] = 1e-11 * t.abs().max()
        else:
            t[2, 3] = float("inf")
    return x.reshape(BS, SEQ, IN), w, go.reshape(BS, SEQ, OUT)


def assert_record(rec: dict, ref: dict, rowwise: bool) -> None:
    if rowwise:
        assert "scale" not in rec
        assert rec["scale_min"] == pytest.approx(ref["scale_min"], rel=1e-6)
        assert rec["scale_max"] == pytest.approx(ref["scale_max"], rel=1e-6)
    else:
        assert rec["scale"] == pytest.approx(ref["scale_min"], rel=1e-6)
    assert rec["amax"] == pytest.approx(ref["amax"], rel=1e-6)
    for key in ("dtype", "numel", "saturated", "underflow"):
        assert rec[key] == ref[key], key


@pytest.mark.parametrize("scenario", ["tiny", "inf"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_records_match_hand_computation(tmp_path, recipe, scenario):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    convert_to_float8_training(model, config=float8_config(recipe))
    x, w, go = operands(scenario)
    with torch.no_grad():
        model[0].weight.copy_(w)
    stats = Float8Stats([model], 5, str(tmp_path), rank=0)
    stats.start_step(10)
    model(x.requires_grad_()).backward(go)
    records = {r["operand"]: r for r in stats.end_step(10)}
    assert set(records) == set(OPERANDS)
    dtypes, rowwise, power_of_2 = RECIPES[recipe]
    for operand, t, dtype in zip(OPERANDS, (x, w, go), dtypes, strict=True):
        rec = records[operand]
        assert (rec["step"], rec["rank"], rec["layer"]) == (10, 0, "0")
        rows = t.reshape(-1, t.shape[-1])
        assert_record(rec, reference(rows, dtype, rowwise, power_of_2), rowwise)
        # the scenario's own numbers, so that the reference is not trivially 0 == 0
        if scenario == "tiny":
            assert rec["saturated"] == 0 and rec["underflow"] >= 5 * 11 / t.numel()
        else:
            assert rec["saturated"] == 1 / t.numel()
            # the infinity's scale is 0: every other non-zero value of its tensor (tensorwise)
            # or of its row (rowwise) underflows
            scaled_by_zero = rows[2] if rowwise else rows
            flushed = scaled_by_zero.isfinite() & (scaled_by_zero != 0)
            assert rec["underflow"] == flushed.sum().item() / t.numel()
    stats.close()


@pytest.fixture
def captured_log():
    """The titan logger's INFO records (it may not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_armed_steps_first_microbatch_jsonl_and_summary(tmp_path, captured_log):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    convert_to_float8_training(model, config=float8_config("tensorwise"))
    dump = tmp_path / "dump"
    stats = Float8Stats([model], 2, str(dump), rank=0)
    first_amax = {}
    for step in range(1, 6):
        stats.start_step(step)
        for mb in range(2):  # two micro-batches of different magnitudes
            x = torch.randn(2, 8, 64) * (10.0 if mb else 1.0)
            x[0, 0, :32] = 1e-12  # layer 0's input underflows: the summary's worst
            grad = torch.randn(2, 8, 64) * (10.0 if mb else 1.0)
            grad[0, 0, :8] = 1e-12  # and so does layer 2's grad_output, less
            if mb == 0:
                first_amax[step] = (x.abs().max().item(), grad.abs().max().item())
            model(x).backward(grad)
        returned = stats.end_step(step)
        assert (returned is None) == (step % 2 == 1)
        assert dump.exists() == (step >= 2)  # nothing written before the first armed step
        if returned is not None:
            assert len(returned) == 2 * 3  # once per layer and operand
            by_key = {(r["layer"], r["operand"]): r for r in returned}
            assert by_key["0", "input"]["amax"] == first_amax[step][0]
            assert by_key["2", "grad_output"]["amax"] == first_amax[step][1]
    lines = (dump / "float8_stats.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 * 2 * 3 and {r["step"] for r in records} == {2, 4}
    assert {(r["layer"], r["operand"]) for r in records} == {
        (layer, op) for layer in ("0", "2") for op in ("input", "weight", "grad_output")
    }
    summaries = [r.getMessage() for r in captured_log if "float8 stats" in r.getMessage()]
    assert len(summaries) == 2
    assert "float8 stats step 4" in summaries[1]
    # 32 and 8 of 1024 values
    assert "most underflow: 0 input 3.12% (rank 0), 2 grad_output 0.781% (rank 0)" in summaries[1]
    assert "most saturated: none" in summaries[1]
    stats.close()


def test_disabled_operand_is_skipped(tmp_path):
    disabled = CastConfig(scaling_type=ScalingType.DISABLED)
    config = float8_config(
        "tensorwise",
        cast_config_grad_output=disabled,
        cast_config_weight_for_grad_input=disabled,
        cast_config_input_for_grad_weight=disabled,
        cast_config_grad_output_for_grad_weight=disabled,
    )
    model = nn.Sequential(nn.Linear(64, 64))
    convert_to_float8_training(model, config=config)
    stats = Float8Stats([model], 1, str(tmp_path), rank=0)
    stats.start_step(0)
    model(torch.randn(4, 64)).sum().backward()
    assert sorted(r["operand"] for r in stats.end_step(0)) == ["input", "weight"]


def titan_model(recipe: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(SMALL)
    model.init_weights()
    convert_to_float8_training(model, config=float8_config(recipe))
    return model


def loss_and_grads(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, SMALL.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
    loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
    }
    return loss.detach(), grads


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_stats_leave_loss_and_gradients_bit_identical(tmp_path, recipe):
    ref_loss, ref_grads = loss_and_grads(titan_model(recipe))
    model = titan_model(recipe)
    stats = Float8Stats([model], 1, str(tmp_path), rank=0)
    stats.start_step(0)
    loss, grads = loss_and_grads(model)
    assert len(stats.end_step(0)) == 3 * (7 * SMALL.n_layers + 1)  # 7 linears a block + output
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def test_layer_names_and_one_record_under_activation_checkpointing(tmp_path):
    plain = titan_model("tensorwise").named_modules()
    names = [n for n, m in plain if isinstance(m, Float8Linear)]
    model = titan_model("tensorwise")
    apply_ac(model, ActivationCheckpoint(mode="full"))
    stats = Float8Stats([model], 1, str(tmp_path), rank=0)
    stats.start_step(0)
    loss_and_grads(model)  # AC runs each block's forward again in backward
    records = stats.end_step(0)
    pairs = [(r["layer"], r["operand"]) for r in records]
    assert sorted(pairs) == sorted(
        (n, op) for n in names for op in ("input", "weight", "grad_output")
    )
    assert "layers.0.attention.wq" in names


def tp_case() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """Two tensorwise float8 linears, an input and an output gradient: the same on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    convert_to_float8_training(model, config=float8_config("tensorwise"))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 64, generator=g)


def _tp_worker(rank: int, port: int, dump: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        styles = {
            "plain": (ColwiseParallel, RowwiseParallel),
            "float8": (Float8ColwiseParallel, Float8RowwiseParallel),  # cast before the layer
        }
        for case, (colwise, rowwise) in styles.items():
            model, x, grad = tp_case()
            parallelize_module(model, mesh, {"0": colwise(), "1": rowwise()})
            stats = Float8Stats([model], 1, f"{dump}/{case}", rank)
            stats.start_step(0)
            model(x).backward(grad)
            assert (stats.end_step(0) is None) == (rank == 1)  # rank 0 gathers and writes
            stats.close()
        dist.barrier()  # torch 2.15 on gloo: a rank that leaves first can abort at exit
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_records_gathered_to_rank_0(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The fork server imports this file once and each worker forks with it loaded. With
    # parallel_harness too, as its tests want, should this test be the one to start the server.
    multiprocessing.set_forkserver_preload(["parallel_harness", __name__])
    mp.start_processes(_tp_worker, (port, str(tmp_path)), nprocs=2, start_method="forkserver")
    model, x, grad = tp_case()
    stats = Float8Stats([model], 1, str(tmp_path / "single"), rank=0)
    stats.start_step(0)
    model(x).backward(grad)
    ref = {(r["layer"], r["operand"]): r for r in stats.end_step(0)}

    def read(case: str) -> list[dict]:
        lines = (tmp_path / case / "float8_stats.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted(r["rank"] for r in records) == [0] * len(ref) + [1] * len(ref)
        return records

    # plain TP styles: the layer sees DTensors and the stats are those of the whole tensors
    for r in read("plain"):
        assert r == ref[r["layer"], r["operand"]] | {"rank": r["rank"]}
    # float8 TP styles cast input and grad_output before the layer: their scale (of the whole
    # tensor) is reported, with amax read back from this rank's float8 values
    shards: dict[tuple[str, str], list[dict]] = {}
    for r in read("float8"):
        shards.setdefault((r["layer"], r["operand"]), []).append(r)
    for key, (r0, r1) in shards.items():
        expected = ref[key]
        assert r0["scale"] == r1["scale"] == expected["scale"], key
        if key[1] == "weight":  # a sharded high-precision DTensor: measured whole
            assert r0 == expected
            continue
        assert r0["precast"] and r0["underflow"] is None, key
        assert max(r0["amax"], r1["amax"]) == pytest.approx(expected["amax"], rel=1e-6)
        local = r0.get("local", False)
        assert r0["numel"] * (2 if local else 1) == expected["numel"], key
