"""Hugging Face saves from the training job (checkpoint.hf_save, titan/checkpoint/hf_save.py):
the step-N-hf folder equals titan-convert-to-hf's export of the same step's DCP checkpoint,
tensor for tensor and bit for bit, in one process and under FSDP 2, TP 2, PP 2 and FSDP 2 x
TP 2 (every rank writing its pieces); transformers loads it and gives titan's logits; a shard
boundary inside a head (wk gathered, permuted and cut back) writes the same rows."""

import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from parallel_harness import DEBUG_TOML, _free_port, make_batches, run_layouts, run_single
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from titan.checkpoint.dcp_io import load_dcp_model
from titan.cli import convert_to_hf
from titan.config import load_config
from titan.models.llama3 import FLAVORS, ModelArgs
from titan.models.llama3.hf_export import sharded_to_hf
from titan.models.llama3.model import Transformer
from titan.models.llama3.state_dict_adapter import to_hf
from titan.trainer.trainer import Trainer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "titan/assets/tokenizer"


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _overrides(dump: Path, *more: str) -> list[str]:
    return [
        "--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.interval", "2",
        "--checkpoint.hf_save", "every", "--training.steps", "2", *more,
    ]  # fmt: skip


def _assert_equals_converter(
    dump: Path, tmp: Path, dtype: str = "float32", step: int = 2, saved: tuple = ()
) -> None:
    """step-N-hf (the job's) == titan-convert-to-hf of step-N, every tensor bitwise, and the
    same config.json and files."""
    ckpt = dump / "checkpoint"
    ours = ckpt / f"step-{step}-hf"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*saved, f"step-{step}", ours.name])
    ref = tmp / f"converted-{dump.name}"
    argv = [str(ckpt / f"step-{step}"), str(ref), "--flavor", "debugmodel", "--dtype", dtype]
    assert convert_to_hf.main([*argv, "--tokenizer-dir", str(TOKENIZER_DIR)]) == 0
    got, want = _safetensors(ours), _safetensors(ref)
    assert got.keys() == want.keys() and len(got) == 6 * 9 + 3
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((ref / name).read_text())
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert (ours / "tokenizer.model").is_file() and not (ours / "sharded").exists()


def test_one_process_equals_converter_and_loads_in_transformers(tmp_path):
    batches = make_batches(2, 8)
    run_single(_overrides(tmp_path / "single"), batches)
    _assert_equals_converter(tmp_path / "single", tmp_path)
    # transformers reads the folder; its logits are titan's on the same weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "single/checkpoint/step-2-hf")
    with torch.device("meta"):
        titan = Transformer(FLAVORS["debugmodel"])
    titan.to_empty(device="cpu")
    titan.init_weights()  # the RoPE buffers; the weights come from the checkpoint
    load_dcp_model(tmp_path / "single/checkpoint/step-2", titan)
    tokens = batches[0, :2, :32]
    with torch.no_grad():
        ours, theirs = titan(tokens), hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_last_step_only_in_bfloat16_from_the_train_loop(tmp_path):
    args = [
        *_overrides(tmp_path), "--training.steps", "3", "--checkpoint.hf_save", "last",
        "--checkpoint.export_dtype", "bfloat16", "--training.seq_len", "32",
        "--data.dataset", "synthetic", "--metrics.log_freq", "1000", "--training.device", "cpu",
    ]  # fmt: skip
    Trainer(load_config(args, config_file=str(DEBUG_TOML))).train()
    # step 2: the interval's full save, no HF folder; step 3: model-only in bf16, and its HF copy
    _assert_equals_converter(tmp_path, tmp_path, "bfloat16", step=3, saved=("step-2",))
    config = json.loads((tmp_path / "checkpoint/step-3-hf/config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


@pytest.mark.heavy
def test_fsdp_tp_pp_equal_converter_2_ranks(tmp_path):
    layouts = {
        "fsdp": ["--parallelism.data_parallel_shard_degree", "2"],
        "tp": ["--parallelism.data_parallel_shard_degree", "1",
               "--parallelism.tensor_parallel_degree", "2"],
        "pp": ["--parallelism.data_parallel_shard_degree", "1",
               "--parallelism.pipeline_parallel_degree", "2"],
    }  # fmt: skip
    cases = [_overrides(tmp_path / name, *o) for name, o in layouts.items()]
    results = run_layouts(2, cases, make_batches(2, 8))
    placements = [r["layout"]["placements"]["layers.0.attention.wq.weight"] for r in results]
    assert "S(0)" in str(placements[0]) and "S(0)" in str(placements[1])  # FSDP, TP
    assert results[2]["layout"]["stages"] == {0: [0], 1: [1]}  # two stages, one per rank
    for name in layouts:
        _assert_equals_converter(tmp_path / name, tmp_path)


@pytest.mark.heavy
def test_fsdp_x_tp_equals_converter_4_ranks(tmp_path):
    # FSDP over TP shards wq/wk as (_StridedShard(0), Shard(0)): gathered, permuted, cut back
    tp = [
        "--parallelism.data_parallel_shard_degree",
        "2",
        "--parallelism.tensor_parallel_degree",
        "2",
    ]
    results = run_layouts(4, [_overrides(tmp_path / "fsdp_tp", *tp)], make_batches(2, 8))
    layout = results[0]["layout"]["placements"]["layers.0.attention.wk.weight"]
    assert layout == (("dp_shard_cp", "tp"), ("S(0)", "S(0)"))
    _assert_equals_converter(tmp_path / "fsdp_tp", tmp_path)


# One KV head of 16 rows (dim 64, 4 query heads): FSDP 2 cuts it in the middle, between the
# rows of rotary pairs, so wk is gathered and cut back; wq's 64 rows split into 2 whole heads
# per rank and are permuted in place.
_ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=32, multiple_of=16)


def _split_head_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # the same full weights on both ranks
    full = {
        "layers.0.attention.wq.weight": torch.randn(64, 64),
        "layers.0.attention.wk.weight": torch.randn(16, 64),
    }
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    hf = sharded_to_hf(sharded, _ARGS, torch.float32)
    # each rank holds its own piece only (no view of a gathered weight)
    own = all(v.to_local().untyped_storage().nbytes() == v.to_local().nbytes for v in hf.values())
    got = {k: (v.placements, v.to_local().shape, v.full_tensor()) for k, v in hf.items()}
    got["own"] = own
    if rank == 0:
        Path(out).write_bytes(pickle.dumps((got, to_hf(full, _ARGS))))
    dist.destroy_process_group()


def test_a_shard_boundary_inside_a_head_permutes_the_same_rows():
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d, "out.pkl"))
        mp.start_processes(
            _split_head_worker, args=(_free_port(), out), nprocs=2, start_method="fork"
        )
        got, want = pickle.loads(Path(out).read_bytes())
    assert got.pop("own")
    assert got.keys() == want.keys()
    for name, (placements, local_shape, full) in got.items():
        assert placements == (Shard(0),) and local_shape[0] == want[name].shape[0] // 2
        assert torch.equal(full, want[name]), name
