"""titan-preprocess (titan/cli/preprocess.py) and training on its files: the same windows as
tokenizing the same files at start-up, inputs in order, and a clear error for every way the files
can be wrong."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from titan.cli import preprocess
from titan.config.job_config import Data
from titan.data.dataloader import build_dataloader, load_embedded_corpus
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.errors import DataError

CORPUS = list(load_embedded_corpus()[:40])


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SHIPPED_TOKENIZER)


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(jsonl file, prefix, metadata): the first 30 corpus documents as jsonl and the next 10 as
    parquet, preprocessed by 2 workers."""
    folder = tmp_path_factory.mktemp("prepared")
    jsonl = _jsonl(folder / "a.jsonl", CORPUS[:30])
    parquet = folder / "b.parquet"
    datasets.Dataset.from_dict({"text": CORPUS[30:]}).to_parquet(str(parquet))
    prefix = folder / "out" / "corpus"
    meta = preprocess.run([str(jsonl), str(parquet), "--output-prefix", str(prefix),
                           "--workers", "2", "--quiet"])  # fmt: skip
    return jsonl, prefix, meta


def test_files_hold_every_document_in_input_order(prepared, tok):
    _, prefix, meta = prepared
    encoded = [tok.encode(d, bos=True, eos=True) for d in CORPUS]
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    offsets = np.load(f"{prefix}.idx")
    assert tokens.tolist() == [t for ids in encoded for t in ids]
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).tolist()
    assert meta["n_documents"] == 40 and meta["n_tokens"] == len(tokens)
    assert meta["max_token_id"] == int(tokens.max()) and meta["dtype"] == "uint16"
    assert json.loads(Path(f"{prefix}.json").read_text())["tokenizer"]["n_words"] == tok.n_words


def test_preprocessed_windows_equal_tokenizing_the_same_file(prepared, tok, tmp_path):
    """Shuffled by the same seed over several epochs, a preprocessed file and the same file
    tokenized at start-up give the same batches."""
    jsonl, _, _ = prepared
    prefix = tmp_path / "a"
    preprocess.main([str(jsonl), "--output-prefix", str(prefix), "--workers", "1", "--quiet"])

    def batches(path) -> list[torch.Tensor]:
        loader = build_dataloader(Data(path=str(path)), tok, seq_len=64, local_batch_size=8,
                                  seed=11)  # fmt: skip
        return [next(loader)[0] for _ in range(30)]  # about 3 epochs

    for a, b in zip(batches(prefix), batches(jsonl), strict=True):
        assert torch.equal(a, b)


def _copy(prefix: Path, to: Path) -> Path:
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{to}{suffix}").write_bytes(Path(f"{prefix}{suffix}").read_bytes())
    return to


def _load(prefix: Path, tok, vocab_size: int | None = None):
    build_dataloader(Data(path=str(prefix)), tok, seq_len=16, local_batch_size=1,
                     vocab_size=vocab_size)  # fmt: skip


def test_every_broken_file_is_named(prepared, tok, tmp_path):
    _, prefix, meta = prepared
    bad = _copy(prefix, tmp_path / "bad")
    _load(bad, tok)  # whole: loads

    Path(f"{bad}.bin").unlink()
    with pytest.raises(DataError, match=r"bad\.bin is missing .*preprocess the data again"):
        _load(bad, tok)
    bad = _copy(prefix, bad)
    with open(f"{bad}.bin", "r+b") as f:
        f.truncate(meta["n_tokens"] * 2 - 6)
    with pytest.raises(DataError, match=rf"bad\.bin has {meta['n_tokens'] * 2 - 6:,} bytes, not "
                       rf"the {meta['n_tokens'] * 2:,} .* truncated"):  # fmt: skip
        _load(bad, tok)
    bad = _copy(prefix, bad)
    np.save(open(f"{bad}.idx", "wb"), np.load(f"{prefix}.idx")[:-3])
    with pytest.raises(DataError, match=r"bad\.idx does not index the 40 documents"):
        _load(bad, tok)
    Path(f"{bad}.idx").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"bad\.idx cannot be read"):
        _load(bad, tok)
    Path(f"{bad}.json").unlink()
    with pytest.raises(DataError, match=r"bad\.json is missing: --data\.path .* names no data"):
        _load(bad, tok)


def test_another_tokenizer_or_a_small_vocabulary_is_refused(prepared, tok, tmp_path):
    _, prefix, meta = prepared
    other = _copy(prefix, tmp_path / "other")
    made = json.loads(Path(f"{other}.json").read_text())
    made["tokenizer"].update(path="/models/Llama-3.1-8B/original/tokenizer.model", sha256="f" * 64)
    Path(f"{other}.json").write_text(json.dumps(made))
    with pytest.raises(DataError, match=r"was tokenized with /models/Llama-3.1-8B/original/"
                       r"tokenizer.model \(sha256 ffffffffffff\), but training uses .*tokenizer"
                       r".model .* set model.tokenizer_path to the first"):  # fmt: skip
        _load(other, tok)
    top = meta["max_token_id"]
    with pytest.raises(DataError, match=rf"holds token id {top}, beyond the model's vocabulary "
                       rf"of {top}: use a flavor or model.vocab_size"):  # fmt: skip
        _load(prefix, tok, vocab_size=top)


def test_an_input_without_documents_stops_preprocessing(tmp_path):
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    for bad in (empty, blank):  # datasets itself refuses both; titan's message names the file
        with pytest.raises(SystemExit, match=rf"{bad.name} (has no documents|cannot be read)"):
            preprocess.main([str(bad), "--output-prefix", str(tmp_path / "e"), "--quiet"])
        assert not Path(f"{tmp_path / 'e'}.json").exists()
