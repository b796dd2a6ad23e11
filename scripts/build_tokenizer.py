"""Train titan's small byte-level BPE on the embedded corpus and write it in Llama 3's format.

    python scripts/build_tokenizer.py [--vocab 2048] [--out titan/assets/tokenizer/tokenizer.model]

Text is pre-tokenized with Llama 3's regex, then pairs are merged by count (ties go to the
smallest pair of byte strings) until there are `--vocab` base tokens; the 256 single bytes get
ranks 0..255 so every byte string encodes. With Llama 3's 256 special tokens on top the
vocabulary is 2304. The same corpus and vocab size always give the same file.
"""

import argparse
import base64
import gzip
import heapq
import json
import sys
import time
from collections import Counter
from pathlib import Path

import regex

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing titan

from titan.data.tokenizer import LLAMA3_PATTERN, Tokenizer  # noqa: E402

Pair = tuple[int, int]


def word_counts(corpus: Path) -> Counter[bytes]:
    """How often each pre-tokenized word (as UTF-8 bytes) occurs in the corpus."""
    pattern = regex.compile(LLAMA3_PATTERN)
    counts: Counter[bytes] = Counter()
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            counts.update(w.encode("utf-8") for w in pattern.findall(json.loads(line)["text"]))
    return counts


class BPETrainer:
    """Merges the most frequent adjacent pair, updating pair counts only in the words it touches."""

    def __init__(self, counts: Counter[bytes]):
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]
        self.ids: dict[bytes, int] = {tok: i for i, tok in enumerate(self.vocab)}
        words = sorted(counts)  # sorted so that set and heap orders cannot leak into the result
        self.words: list[list[int]] = [list(w) for w in words]
        self.freq: list[int] = [counts[w] for w in words]
        self.pair_count: Counter[Pair] = Counter()
        self.pair_words: dict[Pair, set[int]] = {}
        for w, symbols in enumerate(self.words):
            self._add(w, symbols, +1)
        # Max-heap by count, then by the pair's bytes; stale entries are skipped when popped.
        self.heap = [self._entry(p) for p in self.pair_count]
        heapq.heapify(self.heap)

    def _entry(self, pair: Pair) -> tuple[int, bytes, bytes, Pair]:
        return (-self.pair_count[pair], self.vocab[pair[0]], self.vocab[pair[1]], pair)

    def _add(self, w: int, symbols: list[int], sign: int) -> set[Pair]:
        """Add (sign=+1) or remove (-1) word w's pairs from the counts; returns the pairs."""
        adjacent = Counter(zip(symbols, symbols[1:], strict=False))
        for pair, n in adjacent.items():
            self.pair_count[pair] += sign * n * self.freq[w]
            if sign > 0:
                self.pair_words.setdefault(pair, set()).add(w)
        return set(adjacent)

    def _best_pair(self) -> Pair | None:
        while self.heap:
            neg_count, _, _, pair = heapq.heappop(self.heap)
            if neg_count < 0 and self.pair_count.get(pair, 0) == -neg_count:
                return pair
        return None

    def merge(self, pair: Pair) -> None:
        """Replace every occurrence of `pair` by its merged token (a new rank unless it exists)."""
        merged = self.vocab[pair[0]] + self.vocab[pair[1]]
        if merged not in self.ids:
            self.ids[merged] = len(self.vocab)
            self.vocab.append(merged)
        new_id = self.ids[merged]
        changed: set[Pair] = set()
        for w in sorted(self.pair_words.pop(pair)):
            old = self.words[w]
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                    new.append(new_id)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            old_pairs = self._add(w, old, -1)
            new_pairs = self._add(w, new, +1)
            for gone in old_pairs - new_pairs - {pair}:
                self.pair_words[gone].discard(w)
            changed |= old_pairs | new_pairs
            self.words[w] = new
        self.pair_count.pop(pair, None)
        for p in sorted(changed - {pair}):
            if self.pair_count[p] > 0:
                heapq.heappush(self.heap, self._entry(p))

    def train(self, vocab_size: int) -> list[bytes]:
        """Merge until there are vocab_size tokens (fewer if the corpus runs out of pairs)."""
        while len(self.vocab) < vocab_size:
            pair = self._best_pair()
            if pair is None:
                break
            self.merge(pair)
        return self.vocab


def write_model(vocab: list[bytes], out: Path) -> None:
    """One `base64(token) rank` line per token: tiktoken's format, as in Meta's file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab)]
    out.write_text("".join(lines), encoding="ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", type=Path, default=REPO_ROOT / "titan/assets/default_corpus.jsonl.gz"
    )
    parser.add_argument("--vocab", type=int, default=2048, help="base tokens (ranks), 256 or more")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "titan/assets/tokenizer/tokenizer.model"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    counts = word_counts(args.corpus)
    vocab = BPETrainer(counts).train(args.vocab)
    write_model(vocab, args.out)
    seconds = time.perf_counter() - start
    tokenizer = Tokenizer(args.out)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    n_tokens = sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"wrote {args.out}: {len(vocab)} ranks (+256 special = {tokenizer.n_words}) from "
        f"{len(counts):,} distinct words in {seconds:.1f}s; corpus = {n_tokens:,} tokens "
        f"({n_bytes / n_tokens:.2f} bytes/token)"
    )


if __name__ == "__main__":
    main()
