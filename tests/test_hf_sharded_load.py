"""Hugging Face weights loaded shard by shard (titan/models/llama3/hf_load.py): under FSDP 2/4,
HSDP, TP 2, FSDP 2 x TP 2, PP 2 (alone and with FSDP), tied embeddings, LoRA, float8 and
generation's TP loader, every rank's pieces put together equal, bit for bit, the full load the
trainer used before (`titan_state_dict_from_hf`, cast to the parameter's dtype); shard
boundaries fall inside heads, between the two rows of a rotary pair; the errors are the full
load's."""

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from parallel_harness import DEBUG_TOML, _free_port
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from titan.config import load_config
from titan.converters.lora import adapter_keys
from titan.errors import CheckpointError
from titan.models.llama3 import hf_load
from titan.models.llama3.args import FLAVORS, ModelArgs
from titan.models.llama3.build import build_model, check_layout
from titan.models.llama3.hf_io import (
    INDEX_FILE,
    SINGLE_FILE,
    load_hf_state_dict,
    save_hf_checkpoint,
    titan_state_dict_from_hf,
)
from titan.models.llama3.hf_load import load_hf_weights
from titan.models.llama3.load import load_model
from titan.models.llama3.model import Transformer
from titan.models.llama3.pipeline import StageUnion
from titan.parallelisms.parallel_dims import init_parallel

# Heads of 6 rows (3 rotary pairs): FSDP 4 gives wq 9 rows a rank and wk 3, so boundaries fall
# inside heads and between the rows of a pair; vocab 102 and FFN 100 shard unevenly under FSDP 4.
ARGS = ModelArgs(dim=36, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=102, multiple_of=10)
TIED = dataclasses.replace(ARGS, tie_word_embeddings=True)
# titan's CPU init of FSDP x TP (distribute_tensor of a _StridedShard) needs even shards
EVEN = dataclasses.replace(ARGS, vocab_size=104)
DEBUG = FLAVORS["debugmodel"]  # float8 converts linears of 16-multiple sizes only
F8 = ["--model.converters", "float8", "--quantize.linear.float8.auto_filter_small_kn", "false"]
F8_ALL_GATHER = [*F8, "--quantize.linear.float8.enable_fsdp_float8_all_gather", "true"]
BASE = ["--job.config_file", DEBUG_TOML, "--training.device", "cpu"]
FSDP_ONLY = ["--parallelism.data_parallel_shard_degree", "-1"]
TP2 = ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "2"]
PP2_ALONE = [*PP2, "--parallelism.data_parallel_shard_degree", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """HF folders of random weights: bf16 in several shards + index; tied in one file; fp32;
    bf16 of vocabulary 104; the debug model's, bf16."""
    tmp = tmp_path_factory.mktemp("hf_sharded")
    out = {}
    for key, args, dtype, shard_bytes in (
        ("bf16", ARGS, torch.bfloat16, 12_000),
        ("tied", TIED, torch.bfloat16, 10**9),
        ("fp32", ARGS, torch.float32, 10**9),
        ("even", EVEN, torch.bfloat16, 10**9),
        ("debug", DEBUG, torch.bfloat16, 10**9),
    ):
        torch.manual_seed(len(key))
        with torch.device("meta"):
            shapes = Transformer(args).state_dict()
        weights = {k: torch.randn(v.shape) for k, v in shapes.items()}
        out[key] = tmp / key
        save_hf_checkpoint(weights, args, out[key], dtype=dtype, max_shard_bytes=shard_bytes)
    assert len(set(json.loads((out["bf16"] / INDEX_FILE).read_text())["weight_map"].values())) > 4
    single = load_hf_state_dict(out["tied"])  # the same folder as one model.safetensors
    for file in out["tied"].glob("*.safetensors*"):
        file.unlink()
    save_file(single, out["tied"] / SINGLE_FILE, metadata={"format": "pt"})
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train_case(world_size: int, args: ModelArgs, hf_dir: str, overrides: list[str]) -> dict:
    """A model built as the trainer builds it, loaded from hf_dir: its full tensors, the local
    shape of each, and whether the adapters kept their init."""
    cfg = load_config([*BASE, *overrides])
    device = torch.device("cpu")
    dims = check_layout(cfg, args, device, world_size)
    meshes = init_parallel(dims, device)
    parts = build_model(args, dims, meshes, cfg, device, dry_run=False).parts
    model = parts[0] if dims.pp == 1 else StageUnion(parts)
    adapters = adapter_keys(model)
    before = {k: _full(v) for k, v in model.state_dict().items() if k in adapters}
    load_hf_weights(model, hf_dir, args, skip=adapters)
    state = {k: _full(v) for k, v in model.state_dict().items()}
    local = {
        k: tuple((v.to_local() if isinstance(v, DTensor) else v).shape)
        for k, v in model.state_dict().items()
    }
    kept = {k: torch.equal(before[k], state.pop(k)) for k in adapters}
    return {"state": state, "local": local, "adapters_kept": kept}


def _generate_case(world_size: int, args: ModelArgs, hf_dir: str) -> dict:
    """generation's loader under TP over every rank, in bf16 (from an fp32 folder)."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = load_model(hf_dir, args, dtype=torch.bfloat16, tp_mesh=mesh)
    state = {k: _full(v) for k, v in model.state_dict().items()}
    local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()}
    return {"state": state, "local": local, "adapters_kept": {}}


def _worker(rank: int, world_size: int, port: int, cases: list, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="localhost", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = []
    for _name, args, hf_dir, overrides in cases:
        if overrides is None:
            results.append(_generate_case(world_size, args, hf_dir))
        else:
            results.append(_train_case(world_size, args, hf_dir, overrides))
    every_rank = [None] * world_size if rank == 0 else None
    dist.gather_object(results, every_rank, dst=0)
    if rank == 0:
        Path(out_dir, "results.pkl").write_bytes(pickle.dumps(every_rank))
    dist.barrier()
    dist.destroy_process_group()


def _run(world_size: int, cases: list) -> list[list[dict]]:
    """Per case, every rank's result, all cases in one launch of world_size processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(world_size, _free_port(), cases, out), nprocs=world_size,
            start_method="forkserver",
        )  # fmt: skip
        every_rank = pickle.loads(Path(out, "results.pkl").read_bytes())
    return [[ranks[i] for ranks in every_rank] for i in range(len(cases))]


def _assert_equal_to_full_load(name: str, ranks: list[dict], hf_dir: Path, args, dtype) -> None:
    reference = {k: v.to(dtype) for k, v in titan_state_dict_from_hf(hf_dir, args).items()}
    got: dict[str, torch.Tensor] = {}
    for result in ranks:  # pipeline ranks hold some stages each
        got.update(result["state"])
        assert all(result["adapters_kept"].values()), (name, result["adapters_kept"])
    assert sorted(got) == sorted(reference), f"{name}: {sorted(reference.keys() - got.keys())}"
    for key, want in reference.items():
        assert got[key].dtype == dtype and torch.equal(got[key], want), f"{name}: {key} differs"


def _local_rows(ranks: list[dict], key: str) -> list[int]:
    return [r["local"][key][0] for r in ranks if key in r["local"]]


def test_every_layout_loads_the_full_load_bitwise_2_ranks(folders):
    lora = ["--model.converters", "lora", "--lora.use_dora", *FSDP_ONLY]
    cases = [
        ("fsdp 2", ARGS, str(folders["bf16"]), FSDP_ONLY),
        ("tp 2", ARGS, str(folders["bf16"]), TP2),
        (
            "pp 2",
            ARGS,
            str(folders["bf16"]),
            [*PP2, "--parallelism.data_parallel_shard_degree", "1"],
        ),
        ("fsdp 2, tied, one file", TIED, str(folders["tied"]), FSDP_ONLY),
        ("tp 2, tied, one file", TIED, str(folders["tied"]), TP2),
        ("fsdp 2, DoRA", ARGS, str(folders["bf16"]), lora),
        ("fsdp 2, float8 all-gather", DEBUG, str(folders["debug"]), [*FSDP_ONLY, *F8_ALL_GATHER]),
        ("generation's loader, tp 2, bf16", ARGS, str(folders["fp32"]), None),
    ]
    results = _run(2, cases)
    for (name, args, hf_dir, overrides), ranks in zip(cases, results, strict=True):
        dtype = torch.float32 if overrides is not None else torch.bfloat16
        _assert_equal_to_full_load(name, ranks, Path(hf_dir), args, dtype)
    by_name = dict(zip([c[0] for c in cases], results, strict=True))
    wk = "layers.0.attention.wk.weight"
    assert _local_rows(by_name["fsdp 2"], wk) == [6, 6]  # whole heads
    assert _local_rows(by_name["tp 2"], "tok_embeddings.weight") == [51, 51]  # vocab-sharded
    assert _local_rows(by_name["tp 2"], "layers.0.attention.wo.weight") == [36, 36]  # rowwise
    assert by_name["tp 2"][0]["local"]["layers.0.attention.wo.weight"] == (36, 18)
    assert [len(r["state"]) for r in by_name["pp 2"]] == [19, 20]  # embedding + 2; 2 + norm, output
    assert len(by_name["fsdp 2, DoRA"][0]["adapters_kept"]) == 4 * 4 * 3  # wq wk wv wo: A, B, m


def test_every_layout_loads_the_full_load_bitwise_4_ranks(folders):
    bf16 = str(folders["bf16"])
    cases = [
        ("fsdp 4", ARGS, bf16, FSDP_ONLY),
        ("hsdp 2 x 2", ARGS, bf16, ["--parallelism.data_parallel_replicate_degree", "2"]),
        (
            "fsdp 2 x tp 2",
            EVEN,
            str(folders["even"]),
            ["--parallelism.tensor_parallel_degree", "2"],
        ),
        ("pp 2 x fsdp 2", ARGS, bf16, PP2),
    ]
    results = _run(4, cases)
    for (name, args, hf_dir, _), ranks in zip(cases, results, strict=True):
        _assert_equal_to_full_load(name, ranks, Path(hf_dir), args, torch.float32)
    by_name = dict(zip([c[0] for c in cases], results, strict=True))
    # boundaries inside heads of 6 rows, between the two rows of a rotary pair (rows 2i, 2i+1)
    assert _local_rows(by_name["fsdp 4"], "layers.0.attention.wq.weight") == [9, 9, 9, 9]
    assert _local_rows(by_name["fsdp 4"], "layers.0.attention.wk.weight") == [3, 3, 3, 3]
    assert _local_rows(by_name["fsdp 4"], "tok_embeddings.weight") == [26, 26, 26, 24]
    assert _local_rows(by_name["fsdp 2 x tp 2"], "layers.0.attention.wk.weight") == [3, 3, 3, 3]
    assert _local_rows(by_name["hsdp 2 x 2"], "layers.0.attention.wq.weight") == [18] * 4


def test_errors_are_the_full_loads(folders, tmp_path, monkeypatch):
    """A folder that does not fit the model fails from its headers, before any tensor is read,
    with the message of the full load."""
    model = Transformer(ARGS)
    cases = {
        "missing": ("model.layers.1.mlp.up_proj.weight", None),
        "unknown": ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.extra.weight"),
        "wrong shape": ("model.norm.weight", "model.norm.weight"),
    }
    reads = []  # tensors read: none may be
    for what, (drop, add) in cases.items():
        folder = tmp_path / what.replace(" ", "_")
        folder.mkdir()
        tensors = load_hf_state_dict(folders["bf16"])
        value = tensors.pop(drop)
        if add is not None:
            tensors[add] = value[:-1] if what == "wrong shape" else value
        save_file(tensors, folder / SINGLE_FILE)
        with pytest.raises(CheckpointError) as full:
            titan_state_dict_from_hf(folder, ARGS)
        monkeypatch.setattr(hf_load, "_read_piece", lambda *a: reads.append(a))
        with pytest.raises(CheckpointError) as sharded:
            load_hf_weights(model, folder, ARGS)
        assert str(sharded.value) == str(full.value) and not reads, (what, str(sharded.value))
    with pytest.raises(FileNotFoundError, match="Hugging Face checkpoint folder not found"):
        load_hf_weights(model, tmp_path / "nowhere", ARGS)
