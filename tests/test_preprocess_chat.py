"""titan-preprocess --format chat (titan/cli/preprocess.py) and training on its files: every
example rendered and masked as at start-up, window for window the same tokens and labels as the
raw chat files (packed or not, with examples held out), the same losses, and a one-line error for
a text prefix read as chat, a chat prefix read as text, another tokenizer or template, or a
broken targets file."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from test_sft import TOK, chat_set, write_jsonl
from test_train import make_trainer

from titan.cli import preprocess
from titan.config.job_config import Data, Validation
from titan.data.chat import TEMPLATE, render_chat
from titan.data.dataloader import build_chat_windows, build_dataloader
from titan.errors import DataError
from titan.trainer.validate import validation_windows

ROWS = chat_set(60, seed=3)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(folder of the raw files, prefix, metadata): ROWS as a.jsonl (the first 40) and b.jsonl
    (the rest), preprocessed as two inputs by 2 workers, 8 rows a task (so tasks interleave)."""
    folder = tmp_path_factory.mktemp("chat") / "raw"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:40])
    write_jsonl(folder / "b.jsonl", ROWS[40:])
    prefix = folder.parent / "out" / "chat"
    chunk, preprocess.CHUNK = preprocess.CHUNK, 8
    try:
        inputs = [str(folder / "a.jsonl"), str(folder / "b.jsonl")]
        meta = preprocess.run([*inputs, "--output-prefix", str(prefix), "--format", "chat",
                               "--workers", "2", "--quiet"])  # fmt: skip
    finally:
        preprocess.CHUNK = chunk
    return folder, prefix, meta


def test_files_hold_every_example_rendered_and_masked(prepared):
    _, prefix, meta = prepared
    rendered = [render_chat(row["messages"], TOK) for row in ROWS]
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    targets = np.fromfile(f"{prefix}.targets", dtype=np.uint8)
    offsets = np.load(f"{prefix}.idx")
    assert tokens.tolist() == [t for ids, _ in rendered for t in ids]
    assert targets.tolist() == [int(t) for _, mask in rendered for t in mask]
    assert offsets.tolist() == np.cumsum([0] + [len(ids) for ids, _ in rendered]).tolist()
    assert 0 < targets.sum() < len(targets)  # prompts and headers are not targets
    assert meta["kind"] == "chat" and meta["chat_template"] == TEMPLATE
    assert meta["n_documents"] == 60 and meta["n_tokens"] == len(tokens)
    assert meta["n_targets"] == int(targets.sum()) and meta["messages_field"] == "messages"
    assert json.loads(Path(f"{prefix}.json").read_text()) == meta


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("holdout_every", [0, 4])
def test_windows_equal_the_raw_chat_files(prepared, packing, holdout_every):
    """Shuffled by the same seed over about three epochs, every training window (tokens and
    labels) of the preprocessed prefix equals that of the raw files rendered at start-up; so do
    the held-out windows, and validation's."""
    folder, prefix, _ = prepared

    def parts(path) -> dict:
        cfg = Data(path=str(path), format="chat", packing=packing, holdout_every=holdout_every)
        out = {"train": build_chat_windows(cfg, TOK, 48, seed=7)}
        if holdout_every:
            out["holdout"] = build_chat_windows(cfg, TOK, 48, 7, part="holdout")
            v = Validation(enable=True)
            out["validation"] = validation_windows(v, cfg, TOK, 48, 7, TOK.n_words)[0]
        return out

    ours, raw = parts(prefix), parts(folder)
    for part, windows in ours.items():
        n = windows.windows_in_epoch(0)
        assert n == raw[part].windows_in_epoch(0) and n > 1
        count = 3 * n if part == "train" else n  # training repeats, the others are one pass
        for w in range(count):
            (tokens, labels), (want_tokens, want_labels) = windows[w], raw[part][w]
            assert np.array_equal(tokens, want_tokens), (part, w)
            assert np.array_equal(labels, want_labels), (part, w)
        docs = windows.docs  # n_targets (logged at start-up) against a sum per example
        spans = zip(docs.starts, docs.lengths, strict=True)
        by_example = [docs.targets[s : s + n].sum() for s, n in spans]
        assert docs.n_targets() == raw[part].docs.n_targets() == sum(by_example) > 0


def test_training_on_the_prefix_gives_the_raw_files_losses(prepared, tmp_path):
    """Three steps of the debug model: the same losses, to the bit, from either source."""
    folder, prefix, _ = prepared
    args = ("--training.steps", "3", "--training.seq_len", "64", "--training.local_batch_size",
            "4", "--training.deterministic", "--data.format", "chat", "--model.attn_mask_type",
            "block_causal", "--data.holdout_every", "5")  # fmt: skip
    ours = make_trainer(tmp_path / "a", *args, "--data.path", str(prefix)).train()
    raw = make_trainer(tmp_path / "b", *args, "--data.path", str(folder)).train()
    assert len(ours) == 3 and ours == raw


def _copy(prefix: Path, to: Path, **meta) -> Path:
    """The prefix's files under another name, its metadata updated with `meta`."""
    for suffix in (".bin", ".idx", ".targets", ".json"):
        Path(f"{to}{suffix}").write_bytes(Path(f"{prefix}{suffix}").read_bytes())
    made = json.loads(Path(f"{to}.json").read_text())
    Path(f"{to}.json").write_text(json.dumps({**made, **meta}))
    return to


def _chat(prefix: Path, vocab_size: int | None = None):
    return build_chat_windows(Data(path=str(prefix), format="chat"), TOK, 32, 0,
                              vocab_size=vocab_size)  # fmt: skip


def test_a_prefix_of_the_other_format_is_refused(prepared, tmp_path):
    _, prefix, _ = prepared
    with pytest.raises(DataError, match=r"--data.path \S+ holds chat examples \(titan-preprocess "
                       r"--format chat\): set --data.format chat"):  # fmt: skip
        build_dataloader(Data(path=str(prefix)), TOK, seq_len=32, local_batch_size=1)
    text = _copy(prefix, tmp_path / "text", kind="text")  # what text mode writes
    with pytest.raises(DataError, match=r"holds text documents, not chat examples: preprocess "
                       r"the chat files with titan-preprocess --format chat"):  # fmt: skip
        _chat(text)
    older = json.loads(Path(f"{text}.json").read_text())
    del older["kind"]  # text files written before chat mode have no kind
    Path(f"{text}.json").write_text(json.dumps(older))
    with pytest.raises(DataError, match=r"holds text documents, not chat examples"):
        _chat(text)


def test_broken_or_mismatched_chat_files_are_named(prepared, tmp_path):
    _, prefix, meta = prepared
    bad = _copy(prefix, tmp_path / "bad")
    _chat(bad)  # whole: loads
    Path(f"{bad}.targets").unlink()
    with pytest.raises(DataError, match=r"bad\.targets is missing .*preprocess the data again"):
        _chat(bad)
    Path(f"{bad}.targets").write_bytes(Path(f"{prefix}.targets").read_bytes()[:-5])
    with pytest.raises(DataError, match=rf"bad\.targets has {meta['n_tokens'] - 5:,} bytes, not "
                       rf"the {meta['n_tokens']:,} .* truncated"):  # fmt: skip
        _chat(bad)
    old = _copy(prefix, tmp_path / "old", chat_template="llama3-chat-v0")
    with pytest.raises(DataError, match=r"rendered with chat template 'llama3-chat-v0', not this "
                       r"titan's .*preprocess the data again"):  # fmt: skip
        _chat(old)
    identity = {**meta["tokenizer"], "path": "/models/other.model", "sha256": "e" * 64}
    other = _copy(prefix, tmp_path / "other", tokenizer=identity)
    with pytest.raises(DataError, match=r"was tokenized with /models/other.model \(sha256 "
                       r"e{12}\), but training uses .* set model.tokenizer_path"):  # fmt: skip
        _chat(other)
    top = meta["max_token_id"]
    with pytest.raises(DataError, match=rf"holds token id {top}, beyond the model's vocabulary"):
        _chat(prefix, vocab_size=top)


def test_a_bad_example_or_column_stops_preprocessing(tmp_path):
    rows = chat_set(4)
    rows[2] = {"messages": [{"role": "user", "content": "no answer"}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"bad\.jsonl: example 2 has no assistant message"):
        preprocess.main([str(bad), "--output-prefix", str(out), "--format", "chat", "--workers",
                         "1", "--quiet"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no files, no .tmp
    with pytest.raises(SystemExit, match=r"has no column 'conversation'; its columns are "
                       r"\['messages'\]: pick one with --messages-field"):  # fmt: skip
        preprocess.main([str(bad), "--output-prefix", str(out), "--format", "chat",
                         "--messages-field", "conversation", "--quiet"])  # fmt: skip
