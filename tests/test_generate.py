"""Generation: greedy decoding equals transformers' generate (equal and mixed prompt lengths, HF,
DCP and training-checkpoint folders), the KV cache equals re-running the sequence, sampling
filters, seeds and stops, the chat template, tensor parallel 2 under torchrun equals one process,
and scripts/generate.py's errors."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from parallel_harness import load_script
from test_hf_interop import TINY

from titan.checkpoint.dcp_io import load_dcp_model
from titan.cli import generate as generate_cli
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.models.llama3.generation import (
    Sampling,
    filter_logits,
    generate,
    prefill_mask,
    sample,
)
from titan.models.llama3.hf_io import empty_model
from titan.models.llama3.load import checkpoint_args, load_model

ROOT = Path(__file__).resolve().parents[1]
# TINY (GQA, llama3 RoPE scaling whose regimes prompts past position 64 reach) with the shipped
# tokenizer's 2,304 ids, so that the command-line tests can encode text for it
CONFIG = {**TINY, "vocab_size": 2304}
GREEDY = Sampling(temperature=0)
REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)  # ids below the tokenizer's special tokens
    return [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> SimpleNamespace:
    """A tiny random HF Llama (with the shipped tokenizer.model), its DCP conversion, and a
    training checkpoint holding the same weights beside optimizer state."""
    tmp = tmp_path_factory.mktemp("generate")
    c = SimpleNamespace(hf=tmp / "hf", dcp=tmp / "dcp", train=tmp / "step-3")
    torch.manual_seed(0)
    c.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in c.model.parameters():  # wide, so greedy decoding does not repeat one token
            p.normal_(0.0, 0.15) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    c.model.save_pretrained(c.hf)
    shutil.copyfile(ROOT / SHIPPED_TOKENIZER, c.hf / "tokenizer.model")
    assert load_script("convert_from_hf").main([str(c.hf), str(c.dcp)]) == 0
    c.config_json = str(c.hf / "config.json")
    c.args = checkpoint_args(c.hf)
    sd = load_dcp_model(c.dcp, empty_model(c.args).state_dict())
    state = {**sd, "optimizer": {"state": {"step": torch.tensor(3.0)}}, "train_state": {"step": 3}}
    with warnings.catch_warnings():  # that no process group runs: no_dist says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=c.train, no_dist=True)
    c.titan = load_model(c.hf, c.args)
    return c


def _hf_generate(model, prompts: list[list[int]], n: int) -> torch.Tensor:
    """transformers' greedy continuation of left-padded prompts (its own per-row positions)."""
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :], attention[row, longest - len(p) :] = torch.tensor(p), 1
    out = model.generate(
        ids, attention_mask=attention, do_sample=False, max_new_tokens=n, pad_token_id=0
    )
    return out[:, longest:]


def test_greedy_matches_transformers_generate(ckpt):
    equal, mixed = _prompts([40, 40, 40]), _prompts([40, 23, 31], seed=2)
    expected = {id(p): _hf_generate(ckpt.model, p, 40) for p in (equal, mixed)}  # to pos. 80
    for source in (ckpt.hf, ckpt.dcp, ckpt.train):  # each through titan-generate's loader
        args = checkpoint_args(source, config_json=None if source == ckpt.hf else ckpt.config_json)
        model = load_model(source, args)
        for prompts in (equal, mixed):
            ours = generate(model, prompts, 40, GREEDY, pad_id=0).tokens
            assert torch.equal(ours, expected[id(prompts)]), source
            assert len(set(ours.flatten().tolist())) > 10  # a real continuation
    # a batch of mixed lengths gives each row what the prompt alone gives
    batched = generate(ckpt.titan, mixed, 40, GREEDY, pad_id=0).tokens
    for row, prompt in enumerate(mixed):
        assert torch.equal(
            generate(ckpt.titan, [prompt], 40, GREEDY, pad_id=0).tokens[0], batched[row]
        )


def test_prefill_mask_hides_padding():
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    expected = torch.tensor([
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],  # pad rows: themselves only
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
    ]).bool()  # fmt: skip
    assert torch.equal(prefill_mask(real), expected[:, None])


@torch.no_grad()
def test_kv_cache_equals_rerunning_the_sequence(ckpt):
    for prompts in (_prompts([40, 40]), _prompts([40, 17], seed=3)):
        run = generate(ckpt.titan, prompts, 40, GREEDY, pad_id=0, keep_logits=True)
        assert run.tokens.shape == (2, 40) and len(run.logits) == 40
        for row, prompt in enumerate(prompts):  # each prompt alone, no padding, no cache
            for step in range(40):
                seq = torch.tensor([prompt + run.tokens[row, :step].tolist()])
                ref = ckpt.titan(seq)[0, -1]
                assert _rel(run.logits[step][row], ref) <= REL_TOL, (row, step)
                assert ref.argmax().item() == run.tokens[row, step].item()


def test_top_k_1_is_greedy(ckpt):
    logits = torch.randn(8, 2304, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        top1 = sample(logits, Sampling(temperature=1.5, top_k=1, top_p=1.0), gen)
        assert torch.equal(top1, logits.argmax(-1))
    prompts = _prompts([30, 20])
    greedy = generate(ckpt.titan, prompts, 20, GREEDY, pad_id=0).tokens
    top1 = generate(ckpt.titan, prompts, 20, Sampling(1.0, 1, 1.0), pad_id=0).tokens
    assert torch.equal(top1, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # ranked: 1 (0.5), 3 (0.8), 2 (0.95), 0 (1.0)
    logits = probs.log()
    for top_p, top_k, kept in [
        (0.3, 0, {1}), (0.5, 0, {1}), (0.55, 0, {1, 3}), (0.79, 0, {1, 3}),
        (0.81, 0, {1, 3, 2}), (0.96, 0, {0, 1, 2, 3}), (1.0, 0, {0, 1, 2, 3}),
        (1.0, 2, {1, 3}), (0.9, 1, {1}), (0.9, 4, {1, 2, 3}),
    ]:  # fmt: skip
        filtered = filter_logits(logits, top_k, top_p)
        assert set(torch.isfinite(filtered)[0].nonzero().flatten().tolist()) == kept, top_p
    gen = torch.Generator().manual_seed(0)
    draws = [sample(logits, Sampling(1.0, 0, 0.79), gen).item() for _ in range(200)]
    assert set(draws) == {1, 3}


def test_same_seed_same_samples(ckpt):
    prompts, sampling = _prompts([30, 12]), Sampling(temperature=1.0, top_k=0, top_p=0.95)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(ckpt.titan, prompts, 24, sampling, pad_id=0, generator=gen).tokens

    first = run(5)
    assert torch.equal(run(5), first) and not torch.equal(run(6), first)


def test_rows_stop_at_their_stop_token(ckpt):
    prompts = _prompts([30, 25, 12], seed=4)
    free = generate(ckpt.titan, prompts, 30, GREEDY, pad_id=0).tokens.tolist()
    pad = 2052
    for stops in ({free[0][4], free[1][10]}, {free[0][3], free[1][7], free[2][12]}):
        run = generate(ckpt.titan, prompts, 30, GREEDY, pad_id=pad, stop_ids=stops)
        ends = [next((i + 1 for i, t in enumerate(row) if t in stops), 30) for row in free]
        assert run.lengths == ends and run.stopped == [e < 30 for e in ends]
        assert run.tokens.shape[1] == max(ends)  # decoding ends once every row has stopped
        for row, end in enumerate(ends):
            assert run.tokens[row, :end].tolist() == free[row][:end]
            assert (run.tokens[row, end:] == pad).all()
            assert run.completion(row) == free[row][: end - (end < 30)]  # without the stop
    assert max(ends) < 30  # the second set stops every row before the limit


def test_chat_template_and_tokenizer_choice(ckpt, tmp_path):
    script, tok = generate_cli, build_tokenizer(SHIPPED_TOKENIZER)

    # Meta's llama3 ChatFormat: "\n\n" encoded apart from the stripped content, as finetuning
    # renders it (titan.data.chat)
    def enc(text: str) -> list[int]:
        return tok.encode(text, bos=False, eos=False, allowed_special="all")

    for prompt in ("Name three rivers.", " two  spaces\nand a line "):
        expected = [
            *enc("<|begin_of_text|><|start_header_id|>user<|end_header_id|>"), *enc("\n\n"),
            *enc(prompt.strip()), *enc("<|eot_id|><|start_header_id|>assistant<|end_header_id|>"),
            *enc("\n\n"),
        ]  # fmt: skip
        assert script.encode_prompt(tok, prompt, chat=True) == expected
    # text that spells a special token in the prompt stays text
    assert script.encode_prompt(tok, "a <|eot_id|> b", chat=True).count(tok.eot_id) == 1
    assert script.encode_prompt(tok, "hi", chat=False) == [
        tok.bos_id,
        *tok.encode("hi", bos=False, eos=False),
    ]

    def choice(path, *extra) -> str:
        return script.tokenizer_path(script.parse_args([str(path), *extra]))

    assert choice(ckpt.hf) == str(ckpt.hf / "tokenizer.model")
    assert choice(ckpt.hf, "--tokenizer", "x.model") == "x.model"
    assert choice(ckpt.dcp) == SHIPPED_TOKENIZER
    shutil.copytree(ckpt.hf, tmp_path / "hf")
    (tmp_path / "hf" / "original").mkdir()
    shutil.copyfile(ckpt.hf / "tokenizer.model", tmp_path / "hf" / "original" / "tokenizer.model")
    assert choice(tmp_path / "hf") == str(tmp_path / "hf" / "original" / "tokenizer.model")
    shutil.rmtree(tmp_path / "hf" / "original")
    (tmp_path / "hf" / "tokenizer.model").rename(tmp_path / "hf" / "tokenizer.json")
    assert choice(tmp_path / "hf") == str(tmp_path / "hf" / "tokenizer.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_tensor_parallel_2_equals_one_process(ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("def main():\n\nimport os and then the sys module\n")
    argv = [
        str(ckpt.dcp), "--config-json", ckpt.config_json, "--prompt", "The Python",
        "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "24",
        "--temperature", "0.8", "--top-k", "200", "--top-p", "0.95", "--seed", "3",
    ]  # fmt: skip
    assert load_script("generate").main([*argv, "--json-out", str(tmp_path / "one.json")]) == 0
    one_out = capsys.readouterr().out
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(_free_port()), "scripts/generate.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [*launch, *argv, "--json-out", str(tmp_path / "tp.json")]
    run = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    tp = json.loads((tmp_path / "tp.json").read_text())
    assert (one["tensor_parallel"], tp["tensor_parallel"]) == (1, 2)
    assert one["prompts"] == ["The Python", "def main():", "import os and then the sys module"]
    for key in ("prompt_ids", "completion_ids", "completions", "stopped"):
        assert tp[key] == one[key], key
    assert all(len(ids) > 0 for ids in one["completion_ids"])
    assert run.stdout == one_out  # rank 0 alone printed, the same completions
    assert "decode:" in run.stderr and "tokens/s" in run.stderr


def test_errors(ckpt, tmp_path, capsys, monkeypatch):
    script = load_script("generate")
    (tmp_path / "empty").mkdir()
    (tmp_path / "small.json").write_text(json.dumps({**CONFIG, "vocab_size": 512}))
    hf, dcp_cfg = [str(ckpt.hf), "--prompt", "hi"], [str(ckpt.dcp), "--prompt", "hi"]
    cases = [
        ([str(tmp_path / "empty"), "--prompt", "hi"], "is neither a titan DCP folder"),
        (dcp_cfg, "does not record the architecture: give --flavor or --config-json"),
        ([*hf, "--max-new-tokens", "511"], "exceeds the model's max_seq_len 512"),
        ([*hf, "--temperature", "-0.5"], "temperature must be >= 0"),
        ([*hf, "--top-p", "0"], "top_p must be in (0, 1]"),
        ([*hf, "--top-p", "1.5"], "top_p must be in (0, 1]"),
        ([*hf, "--top-k", "-1"], "top_k must be >= 0"),
        (
            [*dcp_cfg, "--config-json", str(tmp_path / "small.json")],
            "token id 2048, beyond the model's vocab_size 512",
        ),
        ([str(ckpt.hf)], "no prompt: give --prompt"),
    ]
    for argv, message in cases:
        assert script.main(argv) == 2, argv
        out, err = capsys.readouterr()
        last = err.splitlines()[-1]  # the error: one line, after any warning
        assert last.startswith("error: ") and message in last and not out, err
        if "vocab_size 512" in message:
            assert "has 2304 ids, the model 512: is it the model's tokenizer?" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # checked before any process group starts
    assert script.main(hf) == 2
    err = capsys.readouterr().err
    assert "tensor parallel over 4 processes" in err and "n_kv_heads = 2" in err
