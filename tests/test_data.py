"""Data tests: packing, dp sharding, exact resume for every source, and the error messages."""

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch

from titan.components.dataloader import (
    DataError,
    PackedTextDataset,
    _IndexedSource,
    build_dataloader,
    build_source,
    load_embedded_corpus,
)
from titan.components.tokenizer import SHIPPED_TOKENIZER, Tokenizer, build_tokenizer
from titan.config.job_config import Data

DOCS = [f"document {i}: " + "words " * (i % 7) for i in range(23)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # datasets reads its env vars at import, so point its config (not the env) at a tmp dir.
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer(SHIPPED_TOKENIZER)


class CharTokenizer:
    """One id per character: BOS=1000, EOS=1001, so the packed stream is easy to spell out."""

    n_words = 1002

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        return [1000] * bos + [ord(c) for c in s] + [1001] * eos


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_same(a: list, b: list):
    assert len(a) == len(b)
    for (x_in, x_lab), (y_in, y_lab) in zip(a, b, strict=True):
        assert torch.equal(x_in, y_in) and torch.equal(x_lab, y_lab)


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _restore(make: Callable[[], object], loader) -> object:
    # JSON then pickle: the state must survive either way a checkpoint might store it.
    state = pickle.loads(pickle.dumps(json.loads(json.dumps(loader.state_dict()))))
    restored = make()
    restored.load_state_dict(state)
    return restored


def _check_resume(make: Callable[[], object], ks: list[int], total: int):
    """For each k: save after k batches, restore in a new loader, take one batch, save and
    restore again; the batches after k equal those of an uninterrupted loader."""
    reference = _take(make(), total)
    for k in ks:
        loader = make()
        _take(loader, k)
        once = _restore(make, loader)
        first = _take(once, 1)
        twice = _restore(make, once)
        _assert_same(first + _take(twice, total - k - 1), reference[k:])


def test_packing_is_contiguous_bos_eos_stream():
    seq_len = 10
    source = _IndexedSource("docs", len(DOCS), DOCS.__getitem__, infinite=True)
    dataset = PackedTextDataset(source, CharTokenizer(), seq_len, dp=(0, 1))
    one_pass = [t for d in DOCS for t in CharTokenizer().encode(d, bos=True, eos=True)]
    stream = one_pass * 3  # documents run across window and pass boundaries
    it = iter(dataset)
    for i in range(len(stream) // (seq_len + 1)):
        inputs, labels = next(it)
        window = stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        assert inputs.tolist() == window[:-1] and labels.tolist() == window[1:]
        assert inputs.dtype == labels.dtype == torch.int64


def test_default_corpus_batches(tok: Tokenizer):
    loader = build_dataloader(Data(), tok, seq_len=32, local_batch_size=4)
    (inputs, labels), (inputs2, _) = _take(loader, 2)
    assert inputs.shape == labels.shape == (4, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    stream = tok.encode(load_embedded_corpus()[0], bos=True, eos=True)
    rows = torch.cat([inputs, inputs2]).tolist()
    for i, row in enumerate(rows):  # row i is window i of the corpus's token stream
        assert row == stream[i * 33 : i * 33 + 32]


def _pass_texts(source, n: int) -> list[str]:
    return [source.next_text() for _ in range(n)]


def test_embedded_corpus_dp_shards_are_disjoint():
    corpus = load_embedded_corpus()
    assert 300 < len(corpus) < 400
    shards = [build_source(Data(), rank, 2) for rank in range(2)]
    texts = [_pass_texts(s, s.num_docs) for s in shards]
    assert texts[0] == list(corpus[0::2]) and texts[1] == list(corpus[1::2])
    assert not set(texts[0]) & set(texts[1])


def test_local_file_dp_shards_are_disjoint(tmp_path: Path):
    cfg = Data(path=str(_write_jsonl(tmp_path / "docs.jsonl", DOCS)))
    shards = [build_source(cfg, rank, 3) for rank in range(3)]
    texts = [_pass_texts(s, s.num_docs) for s in shards]
    assert sorted(sum(texts, [])) == sorted(DOCS)
    assert all(not set(texts[a]) & set(texts[b]) for a, b in [(0, 1), (0, 2), (1, 2)])


def test_resume_embedded_corpus(tok: Tokenizer):
    _check_resume(lambda: build_dataloader(Data(), tok, seq_len=64, local_batch_size=3), [0, 4], 9)


def test_resume_synthetic(tok: Tokenizer):
    def make(seed: int = 7, rank: int = 1):
        cfg = Data(dataset="synthetic")
        return build_dataloader(
            cfg, tok, seq_len=16, local_batch_size=2, dp_rank=rank, dp_degree=2, seed=seed
        )

    _check_resume(make, [0, 3], 7)
    batch = _take(make(), 1)[0][0]
    assert 0 <= batch.min() and batch.max() < tok.n_words
    assert not torch.equal(batch, _take(make(seed=8), 1)[0][0])
    assert not torch.equal(batch, _take(make(rank=0), 1)[0][0])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_local_files(tok: Tokenizer, tmp_path: Path, fmt: str):
    corpus = list(load_embedded_corpus()[:40])
    path = _write_jsonl(tmp_path / "docs.jsonl", corpus)
    if fmt == "parquet":
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": corpus}).to_parquet(str(path))
    cfg = Data(path=str(path))
    _check_resume(lambda: build_dataloader(cfg, tok, seq_len=48, local_batch_size=2), [5], 11)


def test_resume_across_passes(tok: Tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = Data(path=str(_write_jsonl(tmp_path / "small.jsonl", DOCS[:5])))  # ~40 tokens a pass

    def make():
        return build_dataloader(cfg, tok, seq_len=6, local_batch_size=2)

    with caplog.at_level(logging.INFO, logger="titan"):
        _check_resume(make, [1, 3, 4, 7], 12)  # saves landing in passes 1 to 3
    assert "starting pass 3" in caplog.text


def test_resume_streaming_dataset(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A local json file streamed stands in for a hub dataset: same IterableDataset code path.
    # Rank 1 reads documents 1, 3, 5, ...; 1, 5 and 9 span several windows.
    docs = [("long " * 60 if i % 4 == 1 else "") + DOCS[i] for i in range(12)]
    path = _write_jsonl(tmp_path / "stream.jsonl", docs)
    real_load = datasets.load_dataset

    def fake_hub(name, config_name=None, *, split, streaming):
        assert name == "someone/dataset" and streaming
        return real_load("json", data_files=str(path), split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    cfg = Data(dataset="someone/dataset")

    def make():
        return build_dataloader(cfg, tok, seq_len=24, local_batch_size=2, dp_rank=1, dp_degree=2)

    _check_resume(make, [0, 1, 2, 4, 5, 7], 14)  # a pass is about 5 batches
    source = build_source(cfg, 1, 2)
    assert _pass_texts(source, 7) == docs[1::2] + [docs[1]]  # then the second pass starts


def test_finite_data_runs_out(tok: Tokenizer, tmp_path: Path):
    cfg = Data(path=str(_write_jsonl(tmp_path / "small.jsonl", DOCS[:3])), infinite=False)
    with pytest.raises(DataError, match="ran out of data.*--data.infinite true"):
        _take(build_dataloader(cfg, tok, seq_len=16, local_batch_size=4), 10)


def test_hub_failure_names_offline_alternatives(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = Data(dataset="titan-test/no-such-dataset")
    with pytest.raises(DataError) as err:
        build_dataloader(cfg, tok, seq_len=16, local_batch_size=2)
    message = str(err.value)
    assert err.value.__suppress_context__  # one error, not a chain of connection errors
    assert "titan-test/no-such-dataset" in message
    for alternative in ["--data.dataset default", "--data.path", "--data.dataset synthetic"]:
        assert alternative in message


def test_missing_text_field_names_columns(tok: Tokenizer, tmp_path: Path):
    cfg = Data(path=str(_write_jsonl(tmp_path / "docs.jsonl", DOCS, field="content")))
    with pytest.raises(DataError, match=r"no column 'text'.*\['content', 'id'\]"):
        build_dataloader(cfg, tok, seq_len=16, local_batch_size=2)


def test_folder_of_files(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("third paragraph\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.jsonl").write_text('{"text": "ignored"}\n')
    source = build_source(Data(path=str(tmp_path)), 0, 1)
    texts = _pass_texts(source, source.num_docs)
    assert [t.strip() for t in texts] == [
        "first paragraph\nstill first",
        "second paragraph",
        "third paragraph",
    ]
    _write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(DataError, match="several formats"):
        build_source(Data(path=str(tmp_path)), 0, 1)


def test_state_from_another_dp_size_is_refused(tok: Tokenizer):
    saved = build_dataloader(Data(), tok, seq_len=8, local_batch_size=1, dp_rank=0, dp_degree=2)
    _take(saved, 1)
    loader = build_dataloader(Data(), tok, seq_len=8, local_batch_size=1)
    loader.load_state_dict(saved.state_dict())
    with pytest.raises(DataError, match="dp rank 0 of 2"):
        _take(loader, 1)


def test_arrow_file_gives_the_windows_of_the_same_jsonl(tok: Tokenizer, tmp_path: Path):
    import pyarrow as pa

    table = pa.table({"text": DOCS, "id": list(range(len(DOCS)))})
    arrow = tmp_path / "docs.arrow"
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:  # as `datasets` writes its cache
        writer.write_table(table)

    def make(path: Path):
        return build_dataloader(Data(path=str(path)), tok, seq_len=16, local_batch_size=4)

    batches = _take(make(arrow), 6)
    _assert_same(batches, _take(make(_write_jsonl(tmp_path / "docs.jsonl", DOCS)), 6))
    one_pass = [t for doc in DOCS for t in tok.encode(doc, bos=True, eos=True)]
    rows = torch.cat([inputs for inputs, _ in batches]).tolist()
    assert len(rows) * 17 > len(one_pass)  # every document is read, and the next pass begins
    for i, row in enumerate(rows):  # row i is window i of the documents' token stream
        assert row == (one_pass * 2)[i * 17 : i * 17 + 16]
    _check_resume(lambda: make(arrow), [3], 7)
