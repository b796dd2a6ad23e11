"""Data tests: packing, shuffling by epoch, exact resume for every source, the global sample
order under any data-parallel layout, and the error messages."""

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from titan.config.job_config import Data
from titan.data.dataloader import (
    DataError,
    build_dataloader,
    build_documents,
    build_stream,
    load_embedded_corpus,
)
from titan.data.tokenizer import SHIPPED_TOKENIZER, Tokenizer, build_tokenizer
from titan.data.tokens import PackedWindows, TokenDocuments

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

    @staticmethod
    def texts(docs: TokenDocuments) -> list[str]:
        return [
            "".join(map(chr, docs.tokens[a + 1 : a + n - 1]))
            for a, n in zip(docs.starts, docs.lengths, strict=True)
        ]

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


def _docs(texts: list[str]) -> TokenDocuments:
    return TokenDocuments.from_texts("docs", len(texts), texts.__getitem__, CharTokenizer())


def test_packing_is_contiguous_bos_eos_stream():
    seq_len = 10
    windows = PackedWindows(_docs(DOCS), seq_len, seed=0, shuffle=False, infinite=True)
    one_pass = [t for d in DOCS for t in CharTokenizer().encode(d, bos=True, eos=True)]
    stream = one_pass * 3  # documents run across window and pass boundaries
    for i in range(len(stream) // (seq_len + 1)):
        window = windows[i]
        assert window.tolist() == stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        assert window.dtype == np.int64


def test_each_epoch_shuffles_the_documents_by_seed():
    """Epoch e packs the documents in the order drawn from (seed, e): every document once per
    epoch, another order each epoch and seed, the same order for the same seed."""
    enc = CharTokenizer().encode

    def epochs(seed: int, n: int = 2) -> list[list[int]]:
        windows = PackedWindows(_docs(DOCS), 4, seed=seed, shuffle=True, infinite=True)
        per_epoch = sum(len(enc(d, bos=True, eos=True)) for d in DOCS)
        stream = np.concatenate([windows[w] for w in range(n * per_epoch // 5 + 1)]).tolist()
        return [stream[e * per_epoch : (e + 1) * per_epoch] for e in range(n)]

    def order(seed: int, epoch: int) -> list[int]:
        return np.random.default_rng([seed, epoch]).permutation(len(DOCS)).tolist()

    first = epochs(3)
    for e, stream in enumerate(first):
        assert stream == [t for i in order(3, e) for t in enc(DOCS[i], bos=True, eos=True)]
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert first == epochs(3) and first != epochs(4)


def test_default_corpus_batches(tok: Tokenizer):
    loader = build_dataloader(Data(shuffle=False), tok, seq_len=32, local_batch_size=4)
    (inputs, labels), (inputs2, _) = _take(loader, 2)
    assert inputs.shape == labels.shape == (4, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    stream = tok.encode(load_embedded_corpus()[0], bos=True, eos=True)
    rows = torch.cat([inputs, inputs2]).tolist()
    for i, row in enumerate(rows):  # row i is window i of the corpus's token stream
        assert row == stream[i * 33 : i * 33 + 32]


@pytest.mark.parametrize("source", ["default", "synthetic", "jsonl"])
def test_a_step_reads_the_same_windows_under_any_layout(tok: Tokenizer, tmp_path: Path, source):
    """Each step's global batch is the same windows for one process with local batch 8, with
    2 or 4 accumulation steps, and for 2 or 4 data-parallel ranks (with accumulation): the
    ranks' micro-batches together are the one-process batch, in order."""
    cfg = Data(dataset=source) if source != "jsonl" else Data(path=str(
        _write_jsonl(tmp_path / "docs.jsonl", list(load_embedded_corpus()[:30]))))  # fmt: skip

    def steps(dp: int, accumulation: int, n: int = 3) -> list[torch.Tensor]:
        lbs = 8 // dp // accumulation
        loaders = [
            build_dataloader(cfg, tok, seq_len=16, local_batch_size=lbs, dp_rank=r,
                             dp_degree=dp, accumulation=accumulation, seed=5)
            for r in range(dp)
        ]  # fmt: skip
        out = []
        for _ in range(n):
            micro = [[next(loader) for _ in range(accumulation)] for loader in loaders]
            out.append(torch.cat([micro[r][m][0] for m in range(accumulation) for r in range(dp)]))
        return out

    reference = steps(1, 1)
    assert not torch.equal(reference[0], reference[1])
    for dp, accumulation in [(1, 2), (1, 4), (2, 1), (4, 1), (2, 2), (2, 4)]:
        got = steps(dp, accumulation)
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True)), (
            dp,
            accumulation,
        )


def test_resume_under_another_layout_reads_the_uninterrupted_windows(tok: Tokenizer):
    """A state saved after two steps at dp 2 (local batch 2) resumes at dp 1 (local batch 4),
    at dp 4 (local batch 1) and at dp 1 with 2 accumulation steps on the very windows that the
    uninterrupted run reads next; at another seq_len, on the next unread tokens."""

    def make(dp: int, rank: int, lbs: int, accumulation: int = 1, seq_len: int = 16):
        return build_dataloader(Data(), tok, seq_len=seq_len, local_batch_size=lbs,
                                dp_rank=rank, dp_degree=dp, accumulation=accumulation)  # fmt: skip

    whole = torch.cat([inputs for inputs, _ in _take(make(1, 0, 4), 4)])  # (16, 16)
    saved = make(2, 1, 2)
    _take(saved, 2)
    state = pickle.loads(pickle.dumps(saved.state_dict()))
    for dp, lbs, accumulation in [(1, 4, 1), (4, 1, 1), (1, 2, 2)]:
        loaders = [make(dp, r, lbs, accumulation) for r in range(dp)]
        for loader in loaders:
            loader.load_state_dict(state)
        got = [x for _ in range(accumulation) for loader in loaders for x, _ in _take(loader, 1)]
        assert torch.equal(torch.cat(got), whole[8:12]), (dp, lbs, accumulation)
    longer = make(1, 0, 2, seq_len=33)  # 8 windows of 17 tokens read: the next 34 start at 136
    longer.load_state_dict(state)
    stream = np.concatenate([make(1, 0, 1).windows[w] for w in range(12)])
    assert next(longer)[0][0].tolist() == stream[136:169].tolist()


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
    assert not torch.equal(batch, _take(make(rank=0), 1)[0][0])  # rank 0 reads windows 0 and 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_local_files(tok: Tokenizer, tmp_path: Path, fmt: str):
    corpus = list(load_embedded_corpus()[:40])
    path = _write_jsonl(tmp_path / "docs.jsonl", corpus)
    if fmt == "parquet":
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": corpus}).to_parquet(str(path))
    cfg = Data(path=str(path))
    _check_resume(lambda: build_dataloader(cfg, tok, seq_len=48, local_batch_size=2), [5], 11)


def test_resume_across_passes(tok: Tokenizer, tmp_path: Path):
    cfg = Data(path=str(_write_jsonl(tmp_path / "small.jsonl", DOCS[:5])))  # ~40 tokens a pass

    def make():
        return build_dataloader(cfg, tok, seq_len=6, local_batch_size=2)

    _check_resume(make, [1, 3, 4, 7], 12)  # saves landing in passes 1 to 3


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
    source = build_stream(cfg, 1, 2)
    assert [source.next_text() for _ in range(7)] == docs[1::2] + [docs[1]]  # then pass 2
    # a stream's position belongs to its shard: another data-parallel degree is refused
    saved = make()
    _take(saved, 1)
    other = build_dataloader(cfg, tok, seq_len=24, local_batch_size=2, dp_rank=0, dp_degree=1)
    other.load_state_dict(saved.state_dict())
    with pytest.raises(DataError, match="dp rank 1 of 2"):
        _take(other, 1)


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
    docs = build_documents(Data(path=str(tmp_path)), CharTokenizer(), 1002)
    assert [t.strip() for t in CharTokenizer.texts(docs)] == [
        "first paragraph\nstill first",
        "second paragraph",
        "third paragraph",
    ]
    _write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(DataError, match="several formats"):
        build_documents(Data(path=str(tmp_path)), CharTokenizer(), 1002)


def test_arrow_file_gives_the_windows_of_the_same_jsonl(tok: Tokenizer, tmp_path: Path):
    import pyarrow as pa

    table = pa.table({"text": DOCS, "id": list(range(len(DOCS)))})
    arrow = tmp_path / "docs.arrow"
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:  # as `datasets` writes its cache
        writer.write_table(table)

    def make(path: Path):
        cfg = Data(path=str(path), shuffle=False)
        return build_dataloader(cfg, tok, seq_len=16, local_batch_size=4)

    batches = _take(make(arrow), 6)
    _assert_same(batches, _take(make(_write_jsonl(tmp_path / "docs.jsonl", DOCS)), 6))
    one_pass = [t for doc in DOCS for t in tok.encode(doc, bos=True, eos=True)]
    rows = torch.cat([inputs for inputs, _ in batches]).tolist()
    assert len(rows) * 17 > len(one_pass)  # every document is read, and the next pass begins
    for i, row in enumerate(rows):  # row i is window i of the documents' token stream
        assert row == (one_pass * 2)[i * 17 : i * 17 + 16]
    _check_resume(lambda: make(arrow), [3], 7)


def test_batch_size_ramp_reads_more_windows_per_step(tmp_path: Path):
    """training.batch_size_schedule: global batch 4 sequences, 8 from 96 tokens on (3 windows
    of 32, rounded up to the next step: window 4). The steps' windows are the same for one
    process and for dp 2, the accumulation doubles at the ramp, and a state saved just before
    it resumes into the bigger batch."""
    from titan.config.job_config import Training
    from titan.trainer.runtime import grad_accumulation_steps

    tok = build_tokenizer(SHIPPED_TOKENIZER)

    def steps(dp: int, n: int = 4, state=None) -> list[torch.Tensor]:
        t = Training(local_batch_size=2, global_batch_size=4, seq_len=32,
                     batch_size_schedule=["96 8"])  # fmt: skip
        ramp = grad_accumulation_steps(t, dp)
        loaders = [
            build_dataloader(Data(dataset="synthetic"), tok, seq_len=32, local_batch_size=2,
                             dp_rank=r, dp_degree=dp, accumulation=ramp)
            for r in range(dp)
        ]  # fmt: skip
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        out = []
        for _ in range(n):
            acc = loaders[0].accumulation
            micro = [[next(loader)[0] for _ in range(acc)] for loader in loaders]
            out.append(torch.cat([micro[r][m] for m in range(acc) for r in range(dp)]))
        return out, loaders[0]

    one, _ = steps(1)
    assert [len(b) for b in one] == [4, 8, 8, 8]  # step 2 starts at window 4 >= 3
    two, _ = steps(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    _, before_ramp = steps(1, n=1)
    resumed, _ = steps(2, n=3, state=before_ramp.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[1:], strict=True))
    assert grad_accumulation_steps(Training(local_batch_size=2, batch_size_schedule=["1e3 8"]),
                                   2) == [(0, 1), (1, 2)]  # fmt: skip


@pytest.mark.parametrize("entries, message", [
    (["252e6"], r"entry '252e6' is not 'TOKENS GLOBAL_BATCH_SIZE' \(e.g. '252e6 1024'\)"),
    (["2e9 8", "1e9 16"], "increasing token order"),
    (["1e9 6"], r"batch_size_schedule '1e9 6': global batch 6 is not divisible by local_batch"
                r"_size 2 x data-parallel degree 2 = 4"),
])  # fmt: skip
def test_bad_batch_size_schedules_are_named(entries, message):
    from titan.config.job_config import Training
    from titan.errors import ConfigError
    from titan.trainer.runtime import grad_accumulation_steps

    with pytest.raises(ConfigError, match=message):
        grad_accumulation_steps(Training(local_batch_size=2, batch_size_schedule=entries), 2)


def test_holdout_every_keeps_its_documents_out_of_training():
    """data.holdout_every = 5 holds out documents 4, 9, 14, 19: one training epoch is exactly
    the other documents (in a seeded order), and the held-out part is exactly those four."""
    train, held = _docs(DOCS).split(5)
    assert CharTokenizer.texts(held) == [DOCS[i] for i in (4, 9, 14, 19)]
    windows = PackedWindows(train, 4, seed=2, shuffle=True, infinite=True)
    per_epoch = int(train.lengths.sum())
    stream = np.concatenate([windows[w] for w in range(per_epoch // 5)]).tolist()[:per_epoch]
    kept = [d for i, d in enumerate(DOCS) if i % 5 != 4]
    order = np.random.default_rng([2, 0]).permutation(len(kept))
    enc = CharTokenizer().encode
    assert stream == [t for i in order for t in enc(kept[i], bos=True, eos=True)]
    assert _docs(DOCS).split(0)[1].n_docs == 0
