"""Tokenizer tests: the shipped BPE, its trainer, and id-for-id agreement with Meta's tokenizer."""

import base64
import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest
from llama_models.llama3 import tokenizer as llama3_tokenizer

from titan.data.tokenizer import (
    REPO_ROOT,
    SHIPPED_TOKENIZER,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    load_ranks,
)

TEXTS = [
    "",
    "Hello, world! It's 2024 and we're testing 1234567 numbers.",
    "naïve café, Œuvre, Straße, 日本語のテキスト, русский текст, العربية, 😀👍🏽 emoji",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "   leading spaces, trailing spaces   \n\n\n   \t\t  mixed \r\n whitespace \u3000\u00a0 ",
    "special text <|begin_of_text|> and <|eot_id|> stays plain text by default",
    "\x1c\x1d\x1e\x1f control \x00 bytes",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer(SHIPPED_TOKENIZER)


def _long_text() -> str:
    # Over 400k characters with runs longer than 25k of non-whitespace and of whitespace: the
    # inputs on which tiktoken panics unless encode() cuts the text first.
    rng = random.Random(0)
    words = ["alpha", "beta", "γάμμα", "δ", "12345", "!!", "\n", "  ", "\t", "x" * 40]
    body = " ".join(rng.choice(words) for _ in range(60_000))
    return "a" * 30_000 + " " * 60_000 + body + "\u3000" * 26_000 + "b" * 50_001 + body


def test_shipped_tokenizer_sizes_and_special_ids(tok: Tokenizer):
    ranks = load_ranks(REPO_ROOT / SHIPPED_TOKENIZER)
    assert len(ranks) == 2048
    assert all(ranks[bytes([b])] == b for b in range(256))  # every byte string encodes
    assert tok.n_words == 2304
    assert len(tok.special_tokens) == 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (2048, 2049, 2052, 2057)
    assert tok.special_tokens["<|reserved_special_token_0|>"] == 2050
    assert tok.special_tokens["<|image|>"] == 2048 + 11
    assert tok.special_tokens["<|reserved_special_token_2|>"] == 2048 + 12
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 2303


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str):
    ids = tok.encode(text, bos=False, eos=False)
    assert all(0 <= i < 2048 for i in ids)
    assert tok.decode(ids) == text
    framed = tok.encode(text, bos=True, eos=True)
    assert framed == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(framed) == "<|begin_of_text|>" + text + "<|end_of_text|>"


def test_random_unicode_round_trips(tok: Tokenizer):
    rng = random.Random(1)
    chars = [chr(c) for c in range(0x20000) if not 0xD800 <= c < 0xE000]  # no lone surrogates
    text = "".join(rng.choice(chars) for _ in range(5000))
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_long_text_round_trips(tok: Tokenizer):
    text = _long_text()
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_special_token_text(tok: Tokenizer):
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [tok.eot_id]
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"}) == [
        tok.eot_id
    ]
    plain = tok.encode("<|eot_id|>", bos=False, eos=False)
    assert tok.eot_id not in plain and tok.decode(plain) == "<|eot_id|>"
    with pytest.raises(ValueError):
        tok.encode("<|eot_id|>", bos=False, eos=False, disallowed_special="all")


def test_missing_file_error_says_what_to_pass():
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer("no/such/dir/tokenizer.model")
    message = str(err.value)
    assert "no/such/dir/tokenizer.model" in message
    assert "original/tokenizer.model" in message and SHIPPED_TOKENIZER in message


def test_relative_path_falls_back_to_repo_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert build_tokenizer(SHIPPED_TOKENIZER).n_words == 2304
    (tmp_path / "local.model").write_text(
        "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    )
    assert build_tokenizer("local.model").n_words == 512  # the current directory comes first


def test_not_a_tiktoken_file(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_text("bm90IGEgdG9rZW4=\nnot base64 1\n")
    with pytest.raises(ValueError, match="tokenizer.model:1 is not a tiktoken BPE line"):
        build_tokenizer(str(tmp_path / "tokenizer.model"))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bpe_trainer_merges_by_count_then_bytes():
    trainer = _load_script("build_tokenizer").BPETrainer
    # (a,b) occurs 8 times, then (ab,c) 3 times, then (b,c) once.
    vocab = trainer(Counter({b"ab": 5, b"abc": 3, b"bc": 1})).train(259)
    assert vocab[256:] == [b"ab", b"abc", b"bc"]
    # Equal counts: the smaller pair of byte strings merges first, whatever the input order.
    assert trainer(Counter({b"yx": 2, b"ba": 2})).train(258)[256:] == [b"ba", b"yx"]


def test_shipped_tokenizer_is_what_the_script_builds(tmp_path: Path):
    script = _load_script("build_tokenizer")
    counts = script.word_counts(REPO_ROOT / "titan/assets/default_corpus.jsonl.gz")
    script.write_model(script.BPETrainer(counts).train(2048), tmp_path / "tokenizer.model")
    shipped = (REPO_ROOT / SHIPPED_TOKENIZER).read_bytes()
    assert (tmp_path / "tokenizer.model").read_bytes() == shipped


@pytest.fixture(scope="module")
def meta_pair() -> tuple[Tokenizer, object]:
    path = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"
    return TiktokenTokenizer(path), llama3_tokenizer.Tokenizer(path)


def test_matches_meta_attributes(meta_pair):
    ours, meta = meta_pair
    assert ours.n_words == meta.n_words == 128256
    assert ours.special_tokens == meta.special_tokens
    assert (ours.bos_id, ours.eos_id, ours.eot_id, ours.pad_id) == (
        meta.bos_id,
        meta.eos_id,
        meta.eot_id,
        meta.pad_id,
    )


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_meta_ids(meta_pair, bos: bool, eos: bool):
    ours, meta = meta_pair
    for text in TEXTS:
        assert ours.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)
    special = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|reserved_special_token_7|>"
    for allowed in ["all", {"<|eot_id|>"}]:
        expected = meta.encode(special, bos=bos, eos=eos, allowed_special=allowed)
        assert ours.encode(special, bos=bos, eos=eos, allowed_special=allowed) == expected


def test_matches_meta_on_long_text(meta_pair):
    ours, meta = meta_pair
    text = _long_text()
    assert len(text) > 400_000
    ids = ours.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert ours.decode(ids) == meta.decode(ids)
