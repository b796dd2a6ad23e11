"""Blends: the realized mix matches the weights, every source's windows are read once each and
in order, reweighting at a token count, exact resume, and the errors of a bad blend."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from titan.config.job_config import Data
from titan.data.blend import BlendedWindows, block_counts, parse_blend, parse_schedule
from titan.data.dataloader import build_dataloader
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.errors import DataError

LLAMA3_MIX = [0.5, 0.25, 0.17, 0.08]  # general, math and reasoning, code, multilingual


class Labelled:
    """A source whose window i is (its number, i): shows which window the blend read."""

    seq_len = 1

    def __init__(self, number: int):
        self.number = number

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array([self.number, i])


def _read(blend: BlendedWindows, n: int) -> np.ndarray:
    return np.stack([blend[w] for w in range(n)])  # (n, 2): source, index


def test_realized_mix_matches_the_weights():
    blend = BlendedWindows([Labelled(c) for c in range(4)], [(0, LLAMA3_MIX)], 3)
    read = _read(blend, 10_500)
    assert block_counts(LLAMA3_MIX).tolist() == [500, 250, 170, 80]
    # every block holds each source's share exactly; within a block, at most a block off
    assert np.bincount(read[:10_000, 0]).tolist() == [5000, 2500, 1700, 800]
    for n in (137, 2024, 10_500):
        mix = np.bincount(read[:n, 0], minlength=4) / n
        assert np.abs(mix - LLAMA3_MIX).max() <= 1000 / n * 0.5 + 1e-9, (n, mix)
    for c in range(4):  # each source read window by window, none skipped or read twice
        assert read[read[:, 0] == c, 1].tolist() == list(range((read[:, 0] == c).sum()))
    other_seed = _read(BlendedWindows([Labelled(c) for c in range(4)],
                                      [(0, LLAMA3_MIX)], 4), 1000)  # fmt: skip
    assert not np.array_equal(read[:1000], other_seed)


def test_reweighting_at_a_window_continues_each_source():
    """From window 2500 on only the last source: its windows continue where they were."""
    phases = [(0, LLAMA3_MIX), (2500, [0, 0, 0, 1])]
    read = _read(BlendedWindows([Labelled(c) for c in range(4)], phases, 0), 4000)
    assert (read[2500:, 0] == 3).all()
    before = int((read[:2500, 0] == 3).sum())  # 2 whole blocks' 160 and part of the third's 80
    assert 160 <= before <= 240
    assert read[read[:, 0] == 3, 1].tolist() == list(range(before + 1500))


def test_schedule_in_tokens_and_resume(tmp_path: Path):
    """A blend of the embedded corpus and a local file, reweighted after 640 tokens (10
    windows of 64): batches resume exactly, and after the switch only the file is read."""
    tok = build_tokenizer(SHIPPED_TOKENIZER)
    datasets.config.HF_DATASETS_CACHE = tmp_path / "hf"
    path = tmp_path / "other.jsonl"
    other = [f"other document {i}: " + "x " * 50 for i in range(20)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in other))
    cfg = Data(blend=["0.5 default", f"0.5 {path}"], blend_schedule=["640 0 1"])

    def make():
        return build_dataloader(cfg, tok, seq_len=64, local_batch_size=2)

    whole = [x for x, _ in _take(make(), 8)]
    loader = make()
    _take(loader, 3)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    for a, b in zip([x for x, _ in _take(resumed, 5)], whole[3:], strict=True):
        assert torch.equal(a, b)
    blend = make().windows
    assert {blend.locate(w)[0] for w in range(10)} == {0, 1}
    assert all(blend.locate(w)[0] == 1 for w in range(10, 60))
    source, index = blend.locate(12)
    assert torch.equal(whole[6][0], torch.from_numpy(blend.sources[source][index][:-1]))


def _take(loader, n: int) -> list:
    return [next(loader) for _ in range(n)]


def test_bad_blends_are_named(tmp_path: Path):
    tok = build_tokenizer(SHIPPED_TOKENIZER)
    with pytest.raises(DataError, match=r"data.blend entry '0.5' is not 'WEIGHT SOURCE'"):
        parse_blend(["0.5"])
    with pytest.raises(DataError, match=r"entry '-1 default' is not 'WEIGHT SOURCE' with a weight"):
        parse_blend(["-1 default"])
    with pytest.raises(DataError, match=r"'1e9 0.5' is not 'TOKENS' and 2 weights"):
        parse_schedule(["1e9 0.5"], 2)
    with pytest.raises(DataError, match="increasing token order"):
        parse_schedule(["2e9 1 0", "1e9 0 1"], 2)
    with pytest.raises(DataError, match=r"weights \[0.0, 0.0\] are all zero"):
        block_counts([0.0, 0.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"data.blend source '{empty}': .*found no files"):
        build_dataloader(Data(blend=["1 default", f"1 {empty}"]), tok, seq_len=8,
                         local_batch_size=1)  # fmt: skip
