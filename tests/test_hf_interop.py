"""Hugging Face interop: safetensors <-> titan DCP round trips, logits and greedy parity with
transformers, exports that from_pretrained loads, sharding, config.json parsing, clear errors."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from parallel_harness import load_script

from titan.checkpoint.dcp_io import load_dcp_model, save_dcp_model
from titan.errors import CheckpointError
from titan.models.llama3 import FLAVORS, ModelArgs, hf_io
from titan.models.llama3.hf_io import (
    args_from_hf_config,
    check_args_match,
    empty_model,
    load_hf_state_dict,
    save_hf_checkpoint,
)
from titan.models.llama3.state_dict_adapter import hf_config_dict

ROOT = Path(__file__).resolve().parents[1]
# rope: head_dim 16 and original_max_position_embeddings 64 put one frequency in each regime
# of Llama 3.1 scaling (kept, interpolated) and the rest slowed; prompts run past position 64.
TINY = dict(
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=512,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, read with safetensors alone (not titan's loader)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _tiny_hf_model(tied: bool):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)
    )
    with torch.no_grad():
        for p in model.parameters():
            # Wider than transformers' init so greedy decoding is not one repeated token, and
            # norm gains away from 1 so a swapped norm would show.
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tmp_path_factory) -> SimpleNamespace:
    """A tiny HF checkpoint, its titan DCP conversion, and the fp32 export of that DCP."""
    tmp = tmp_path_factory.mktemp("tied" if request.param else "untied")
    c = SimpleNamespace(tied=request.param, hf=tmp / "hf", dcp=tmp / "dcp", out=tmp / "out")
    _tiny_hf_model(c.tied).save_pretrained(c.hf)
    assert load_script("convert_from_hf").main([str(c.hf), str(c.dcp)]) == 0
    cfg = ["--config-json", str(c.hf / "config.json")]
    argv = [str(c.dcp), str(c.out), *cfg, "--dtype", "float32"]
    assert load_script("convert_to_hf").main(argv) == 0
    c.config_args = cfg
    return c


def test_round_trip_is_bit_identical(ckpt, tmp_path):
    original, back = _safetensors(ckpt.hf), _safetensors(ckpt.out)  # HF -> DCP -> HF
    assert set(back) == set(original) and ("lm_head.weight" in back) != ckpt.tied
    for name, w in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], w), name
    bf16 = tmp_path / "bf16"
    assert load_script("convert_to_hf").main([str(ckpt.dcp), str(bf16), *ckpt.config_args]) == 0
    for name, w in _safetensors(bf16).items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, original[name].bfloat16()), name
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_logits_and_greedy_match_transformers(ckpt):
    parity = load_script("verify_hf_parity")
    tokens = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(1))
    # titan reads each folder with its own code; transformers reads the original HF folder
    for source in (ckpt.hf, ckpt.dcp, ckpt.out):
        titan, hf = parity.load_models(source, hf_reference=ckpt.hf)
        kl, max_diff = parity.compare_logits(titan, hf, tokens)
        assert abs(kl) <= 1e-10 and max_diff < 1e-4, (source, kl, max_diff)
        ours = parity.greedy_decode(titan, tokens, 12)
        theirs = parity.greedy_decode(lambda t, m=hf: m(t, use_cache=False).logits, tokens, 12)
        assert torch.equal(ours, theirs)
        assert len(set(ours.flatten().tolist())) > 2  # a real continuation, not one token
    # the exit code follows the threshold
    assert parity.main([str(ckpt.hf), "--tokens", "2", "--max-kl", "-1"]) == 1


@pytest.mark.parametrize("ckpt", [False], ids=["untied"], indirect=True)  # one launch is enough
def test_verify_script_reports_and_exits_zero(ckpt):
    script = [sys.executable, "scripts/verify_hf_parity.py"]
    cmd = [*script, str(ckpt.dcp), "--hf-reference", str(ckpt.hf)]  # titan's load vs the original
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    kl_line, greedy_line = run.stdout.strip().splitlines()[-2:]
    assert kl_line.startswith("kl_divergence: ") and float(kl_line.split()[1]) <= 1e-10
    assert greedy_line == "greedy_identical: true"


def test_hf_reference_catches_a_wrong_dcp_load(ckpt, tmp_path, capsys):
    # a DCP whose wq rows are in HF's order (each head's halves) instead of Meta's (interleaved
    # pairs), as a load that skipped the permutation would leave them
    parity = load_script("verify_hf_parity")
    args = args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    sd = load_dcp_model(ckpt.dcp, empty_model(args).state_dict())
    wq = sd["layers.1.attention.wq.weight"]  # (n_heads * head_dim, dim)
    pairs = wq.view(args.n_heads, args.head_dim // 2, 2, args.dim)
    sd["layers.1.attention.wq.weight"] = pairs.transpose(1, 2).reshape(wq.shape)
    save_dcp_model(sd, tmp_path / "bad")
    quick = ["--tokens", "4"]
    # transformers built from titan's loaded weights agrees with them: blind to the bad load
    assert parity.main([str(tmp_path / "bad"), *ckpt.config_args, *quick]) == 0
    assert parity.main([str(ckpt.dcp), "--hf-reference", str(ckpt.hf), *quick]) == 0
    capsys.readouterr()
    assert parity.main([str(tmp_path / "bad"), "--hf-reference", str(ckpt.hf), *quick]) == 1
    kl_line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kl_"))
    assert float(kl_line.split()[1]) > 1e-3, kl_line


def test_export_loads_with_from_pretrained(ckpt):
    tokens = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(2))
    original = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf).eval()
    export = transformers.AutoModelForCausalLM.from_pretrained(ckpt.out).eval()
    if ckpt.tied:
        assert export.lm_head.weight.data_ptr() == export.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(export(tokens).logits, original(tokens).logits, rtol=0, atol=0)
    assert args_from_hf_config(json.loads((ckpt.out / "config.json").read_text())) == (
        args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    )


def test_sharded_export_index_covers_every_tensor(ckpt, tmp_path):
    from safetensors import safe_open

    args = args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    model = empty_model(args)
    load_dcp_model(ckpt.dcp, model)
    index = save_hf_checkpoint(model.state_dict(), args, tmp_path / "s", torch.float32, 100_000)
    assert json.loads((tmp_path / "s" / hf_io.INDEX_FILE).read_text()) == index
    files = sorted((tmp_path / "s").glob("model-*.safetensors"))
    assert len(files) > 3 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    seen, total = {}, 0
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                seen[key] = f.name
                total += st.get_tensor(key).numel() * 4
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    original = load_hf_state_dict(ckpt.hf)
    back = load_hf_state_dict(tmp_path / "s")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folder left behind


def test_interrupted_export_leaves_no_folder(ckpt, tmp_path, monkeypatch):
    args = args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    sd = empty_model(args).state_dict()
    calls = []

    def failing_save(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*a, **kw)

    save_file = hf_io.save_file
    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(sd, args, tmp_path / "out", torch.float32, 100_000)
    assert list(tmp_path.iterdir()) == []


def _hf_style_config(**over) -> dict:
    return {**hf_config_dict(FLAVORS["8B"]), **over}


def test_config_json_formats_and_flavor_checks():
    # Llama-3.1-8B's config.json as transformers 4.43 wrote it
    llama31_8b = _hf_style_config(
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", pretraining_tp=1
    )
    check_args_match(args_from_hf_config(llama31_8b), FLAVORS["8B"], "8B")
    # transformers 5.x: one rope_parameters dict that also holds rope_theta
    v5 = {k: v for k, v in llama31_8b.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**llama31_8b["rope_scaling"], "rope_theta": 500000.0}
    assert args_from_hf_config(v5) == args_from_hf_config(llama31_8b)
    # older 4.x: "type" instead of "rope_type"; no scaling at all
    old = {**llama31_8b, "rope_scaling": {**llama31_8b["rope_scaling"], "type": "llama3"}}
    del old["rope_scaling"]["rope_type"]
    assert args_from_hf_config(old).rope_scaling == FLAVORS["8B"].rope_scaling
    assert args_from_hf_config({**llama31_8b, "rope_scaling": None}).rope_scaling is None
    for flavor, args in FLAVORS.items():  # every flavor survives config.json and back
        check_args_match(args_from_hf_config(hf_config_dict(args)), args, flavor)
    with pytest.raises(ValueError, match=r"(?s)--flavor 70B.*dim: config.json 4096 vs 70B 8192"):
        check_args_match(args_from_hf_config(llama31_8b), FLAVORS["70B"], "70B")
    with pytest.raises(ValueError, match="vocab_size"):
        check_args_match(args_from_hf_config({**llama31_8b, "vocab_size": 128}), FLAVORS["8B"])
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        args_from_hf_config({**llama31_8b, "rope_scaling": {"rope_type": "yarn"}})


def test_bos_eos_ids_and_tokenizer_files(tmp_path):
    tok_dir = ROOT / "titan" / "assets" / "tokenizer"
    small = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=2304, max_seq_len=16)
    sd = {k: torch.zeros_like(v) for k, v in empty_model(small).state_dict().items()}
    save_hf_checkpoint(sd, small, tmp_path / "tok", tokenizer_dir=tok_dir)
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (2048, 2049)
    gen = json.loads((tmp_path / "tok" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2048, "eos_token_id": 2049}
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == (
        (tok_dir / "tokenizer.model").read_bytes()
    )
    save_hf_checkpoint(sd, small, tmp_path / "none")  # debug vocab, no tokenizer: no guess
    assert "bos_token_id" not in json.loads((tmp_path / "none" / "config.json").read_text())
    real = dataclasses.replace(small, vocab_size=128256, tie_word_embeddings=True)
    sd = {k: torch.zeros_like(v) for k, v in empty_model(real).state_dict().items()}
    save_hf_checkpoint(sd, real, tmp_path / "real")
    config = json.loads((tmp_path / "real" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_dcp_model_from_a_training_checkpoint(ckpt, tmp_path):
    args = args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    expected = load_dcp_model(ckpt.dcp, empty_model(args).state_dict())
    sd = dict(expected)
    if args.tie_word_embeddings:
        del sd["output.weight"]  # a tied model also loads from the embedding alone
    full = {**sd, "optimizer": {"state": {"step": torch.tensor(3.0)}}, "train_state": {"step": 7}}
    dcp.save(full, checkpoint_id=tmp_path / "step-7", no_dist=True)
    model = empty_model(args)
    load_dcp_model(tmp_path / "step-7", model)
    for name, w in model.state_dict().items():
        assert torch.equal(w, expected[name]), name


def test_errors_name_the_path(ckpt, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere"):
        load_hf_state_dict(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has neither model.safetensors nor"):
        load_hf_state_dict(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="empty is not a DCP checkpoint"):
        load_dcp_model(tmp_path / "empty", {})
    # --flavor that disagrees with config.json
    assert load_script("convert_from_hf").main(
        [str(ckpt.hf), str(tmp_path / "x"), "--flavor", "1B"]
    )
    err = capsys.readouterr().err
    assert "does not match --flavor 1B" in err and "dim: config.json 128 vs 1B 2048" in err
    # a DCP of other shapes than the flavor's
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt.dcp} does not fit the model")):
        load_dcp_model(ckpt.dcp, empty_model(dataclasses.replace(FLAVORS["debugmodel"])))
    # truncated .distcp
    broken = Path(shutil.copytree(ckpt.dcp, tmp_path / "broken"))
    distcp = next(broken.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    args = args_from_hf_config(json.loads((ckpt.hf / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=re.escape(f"{distcp} is truncated: ")):
        load_dcp_model(broken, empty_model(args))
    argv = [str(broken), str(tmp_path / "out"), *ckpt.config_args]
    assert load_script("convert_to_hf").main(argv) == 2
    assert str(broken) in capsys.readouterr().err and not (tmp_path / "out").exists()
