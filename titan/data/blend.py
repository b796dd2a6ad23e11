"""Weighted blends of data sources, read by global window index like one source.

`data.blend = ["0.5 /data/general", "0.25 /data/math", ...]` mixes sources by weight;
`data.blend_schedule = ["2.8e12 0.3 0.2 0.5"]` changes the weights from a token count on (the
Llama 3 recipe's annealing on upsampled high-quality data). Within every block of BLOCK windows
each source gets its weight's share (largest remainders), in an order drawn from (seed, phase,
block): the realized mix is within one block of the weights at every point, and window w's
source and its index in that source are computed directly, so reading stays layout-free and a
resume needs only the window count.
"""

from collections.abc import Sequence

import numpy as np

from titan.errors import DataError

BLOCK = 1000


def parse_blend(entries: Sequence[str]) -> list[tuple[float, str]]:
    """["WEIGHT SOURCE", ...] -> [(weight, source)]."""
    parsed = []
    for entry in entries:
        weight, _, source = entry.strip().partition(" ")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if value < 0 or not source.strip():
            raise DataError(f"data.blend entry {entry!r} is not 'WEIGHT SOURCE' with a weight "
                            ">= 0 (e.g. '0.25 /data/math' or '0.5 default')")  # fmt: skip
        parsed.append((value, source.strip()))
    return parsed


def parse_schedule(entries: Sequence[str], n: int) -> list[tuple[float, list[float]]]:
    """["TOKENS W1 ... Wn", ...] -> [(tokens, weights)], in increasing token order."""
    parsed = []
    for entry in entries:
        fields = entry.split()
        try:
            tokens, weights = float(fields[0]), [float(x) for x in fields[1:]]
        except (ValueError, IndexError):
            tokens, weights = -1.0, []
        if tokens < 0 or len(weights) != n or min(weights) < 0:
            raise DataError(f"data.blend_schedule entry {entry!r} is not 'TOKENS' and {n} "
                            "weights >= 0, one per data.blend source")  # fmt: skip
        parsed.append((tokens, weights))
    if [t for t, _ in parsed] != sorted(t for t, _ in parsed):
        raise DataError("data.blend_schedule entries must be in increasing token order")
    return parsed


def block_counts(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Windows per source in a block: the weights' shares of `block`, by largest remainders."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise DataError(f"data.blend weights {list(weights)} are all zero")
    share = w / w.sum() * block
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


class BlendedWindows:
    """Window w of the mix: window i of source c, with (c, i) computed from w alone."""

    def __init__(self, sources: list, phases: list[tuple[int, list[float]]], seed: int,
                 block: int = BLOCK):  # fmt: skip
        """sources: objects with [i] -> window; phases: [(first window, weights)] from 0 on."""
        self.sources, self.seed, self.block = sources, seed % 2**63, block
        self.seq_len = sources[0].seq_len
        self.starts = [start for start, _ in phases]
        self.counts = [block_counts(w, block) for _, w in phases]
        # windows each source gave before each phase: full blocks, then the partial last one
        self.before = [np.zeros(len(sources), dtype=np.int64)]
        for p in range(len(phases) - 1):
            full, rest = divmod(self.starts[p + 1] - self.starts[p], block)
            part = np.bincount(self._order(p, full)[:rest], minlength=len(sources))
            self.before.append(self.before[p] + full * self.counts[p] + part)

    def _order(self, phase: int, block: int) -> np.ndarray:
        slots = np.repeat(np.arange(len(self.sources)), self.counts[phase])
        return np.random.default_rng([self.seed, phase, block]).permutation(slots)

    def locate(self, w: int) -> tuple[int, int]:
        """(source, window index in it) of blended window w."""
        p = int(np.searchsorted(self.starts, w, side="right")) - 1
        b, j = divmod(w - self.starts[p], self.block)
        order = self._order(p, b)
        c = int(order[j])
        return c, int(self.before[p][c] + b * self.counts[p][c] + np.count_nonzero(order[:j] == c))

    def __getitem__(self, w: int) -> np.ndarray:
        c, i = self.locate(w)
        return self.sources[c][i]
