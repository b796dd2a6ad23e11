"""Training windows read by global index, so the data of a step does not depend on the layout.

Documents are one token array (each document BOS ... EOS) plus document offsets: tokenized at
start-up (the embedded corpus, local files), or memory-mapped from the files that
`titan-preprocess` writes (PREFIX.bin tokens, PREFIX.idx offsets, PREFIX.json what
made them). Every epoch puts the documents in an order drawn from (seed, epoch) and packs them
back to back into one stream; window w is tokens [w (seq_len + 1), (w + 1)(seq_len + 1)) of the
epochs laid end to end. `GlobalBatchLoader` hands each data-parallel rank its slice of every
step's global batch: the step's windows are the same whatever the data-parallel degree, local
batch size and gradient accumulation, and its state (windows consumed) resumes under any of them.
"""

import copy
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from titan.data.tokenizer import Tokenizer, build_tokenizer
from titan.errors import DataError
from titan.logger import logger

IGNORE_INDEX = -100  # label value of positions that carry no loss (padding, masked prompts)

FORMAT = "titan-tokens-v1"


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a token file records of the tokenizer that made it: ids are only meaningful to it."""
    digest = hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()
    return {
        "path": str(tokenizer.path),
        "sha256": digest,
        "n_words": tokenizer.n_words,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def first_window(tokens: float, seq_len: int) -> int:
    """The first window that starts at or past `tokens` trained (seq_len tokens a window)."""
    return -(-int(tokens) // seq_len)


def token_dtype(n_words: int) -> np.dtype:
    return np.dtype(np.uint16 if n_words <= 2**16 else np.uint32)


def encode_texts(task: tuple[str, list[str]]) -> list[np.ndarray]:
    """(tokenizer path, texts) -> each text's ids, BOS ... EOS: a worker's task in
    titan-preprocess (the tokenizer is built once per worker process)."""
    path, texts = task
    tok = _worker_tokenizer(path)
    dtype = token_dtype(tok.n_words)
    return [np.asarray(tok.encode(t, bos=True, eos=True), dtype=dtype) for t in texts]


@functools.cache
def _worker_tokenizer(path: str) -> Tokenizer:
    return build_tokenizer(path)


class TokenDocuments:
    """Documents in one token array: document i is tokens[starts[i] : starts[i] + lengths[i]].
    Built from offsets (n_docs + 1: where each starts, and the end)."""

    KIND = "text"  # what preprocessed files must hold to load as this class (their "kind")

    def __init__(self, name: str, tokens: np.ndarray, offsets: np.ndarray):
        self.name, self.tokens = name, tokens
        self.starts, self.lengths = np.asarray(offsets[:-1]), np.diff(offsets)

    def split(self, every: int) -> tuple["TokenDocuments", "TokenDocuments"]:
        """(training, held out): every `every`-th document (indices every-1, 2 every-1, ...) is
        held out, for validation; every = 0 holds out none."""
        held = np.zeros(self.n_docs, dtype=bool)
        if every > 0:
            held[every - 1 :: every] = True
        parts = []
        for keep, what in ((~held, self.name), (held, f"{self.name} (held out)")):
            part = copy.copy(self)  # keeps what a subclass adds (ChatExamples' targets)
            part.name, part.starts, part.lengths = what, self.starts[keep], self.lengths[keep]
            parts.append(part)
        return parts[0], parts[1]

    @property
    def n_docs(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_texts(
        cls, name: str, n_docs: int, text: Callable[[int], str], tokenizer: Tokenizer
    ) -> "TokenDocuments":
        """Tokenize documents 0..n_docs-1 now (BOS doc EOS each)."""
        if n_docs > 100_000:
            logger.info(
                f"data: tokenizing {n_docs:,} documents of {name} at start-up; "
                "titan-preprocess does this once, in parallel"
            )
        pieces = [tokenizer.encode(text(i), bos=True, eos=True) for i in range(n_docs)]
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        tokens = np.fromiter(
            (t for p in pieces for t in p), token_dtype(tokenizer.n_words), count=int(offsets[-1])
        )
        return cls(name, tokens, offsets)

    @classmethod
    def load(cls, prefix: str, tokenizer: Tokenizer, vocab_size: int) -> "TokenDocuments":
        """Memory-map PREFIX.bin/.idx; every file is checked against PREFIX.json first."""
        meta = read_metadata(prefix)
        _check_kind(prefix, meta.get("kind", "text"), cls.KIND)  # files of before chat: text
        dtype = np.dtype(meta["dtype"])
        bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise DataError(
                    f"{path} is missing (written with {prefix}.json by "
                    "titan-preprocess): preprocess the data again"
                )
        want = meta["n_tokens"] * dtype.itemsize
        if bin_path.stat().st_size != want:
            raise DataError(
                f"{bin_path} has {bin_path.stat().st_size:,} bytes, not the "
                f"{want:,} of {meta['n_tokens']:,} tokens that {prefix}.json records: "
                "the file is truncated or from another run; preprocess again"
            )
        try:
            offsets = np.load(idx_path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{idx_path} cannot be read ({e}): preprocess the data again") from None
        if offsets.shape != (meta["n_documents"] + 1,) or int(offsets[-1]) != meta["n_tokens"]:
            raise DataError(
                f"{idx_path} does not index the {meta['n_documents']:,} documents "
                f"and {meta['n_tokens']:,} tokens {prefix}.json records: truncated "
                "or from another run; preprocess the data again"
            )
        _check_tokenizer(prefix, meta, tokenizer, vocab_size)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        return cls(f"--data.path {prefix}", tokens, np.asarray(offsets))


def read_metadata(prefix: str) -> dict[str, Any]:
    path = Path(f"{prefix}.json")
    if not path.is_file():
        raise DataError(
            f"{path} is missing: --data.path {prefix} names no data written by titan-preprocess"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): preprocess the data again") from None
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path} is not a titan token file (format {meta.get('format')!r}, "
            f"expected {FORMAT!r}): preprocess the data again"
        )
    return meta


def _check_kind(prefix: str, kind: str, want: str) -> None:
    if kind == want:
        return
    if want == "text":
        raise DataError(f"--data.path {prefix} holds chat examples (titan-preprocess --format "
                        "chat): set --data.format chat, or preprocess text documents without "
                        "--format chat")  # fmt: skip
    raise DataError(f"--data.path {prefix} holds {kind} documents, not chat examples: preprocess "
                    "the chat files with titan-preprocess --format chat, or set --data.format "
                    "text")  # fmt: skip


def _check_tokenizer(prefix: str, meta: dict, tokenizer: Tokenizer, vocab_size: int) -> None:
    made_by, ours = meta["tokenizer"], tokenizer_identity(tokenizer)
    if made_by["sha256"] != ours["sha256"]:
        raise DataError(
            f"--data.path {prefix} was tokenized with {made_by['path']} (sha256 "
            f"{made_by['sha256'][:12]}), but training uses {ours['path']} (sha256 "
            f"{ours['sha256'][:12]}): set model.tokenizer_path to the first, or preprocess the "
            "data again with --tokenizer naming the second"
        )
    if meta["max_token_id"] >= vocab_size:
        raise DataError(
            f"--data.path {prefix} holds token id {meta['max_token_id']}, beyond the model's "
            f"vocabulary of {vocab_size}: use a flavor or model.vocab_size with room for it"
        )


class PackedWindows:
    """Window w (seq_len + 1 tokens) of the documents packed epoch after epoch, each epoch in an
    order drawn from (seed, epoch) when shuffling."""

    def __init__(
        self, docs: TokenDocuments, seq_len: int, seed: int, shuffle: bool, infinite: bool
    ):
        if docs.n_docs == 0 or int(docs.lengths.sum()) == 0:
            raise DataError(f"{docs.name} has no documents")
        self.docs, self.seq_len, self.seed = docs, seq_len, seed % 2**63
        self.shuffle, self.infinite = shuffle, infinite
        self.epoch_tokens = int(docs.lengths.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, where each document starts in the epoch's stream)."""
        if epoch not in self._epochs:
            order = np.arange(self.docs.n_docs)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.docs.n_docs)
            starts = np.concatenate([[0], np.cumsum(self.docs.lengths[order])])
            if len(self._epochs) > 1:  # windows move forward: keep this epoch and the last
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def __getitem__(self, w: int) -> np.ndarray:
        n = self.seq_len + 1
        pos, out = w * n, []
        while n:
            epoch, at = divmod(pos, self.epoch_tokens)
            if epoch > 0 and not self.infinite:
                raise DataError(
                    f"ran out of data: one pass over {self.docs.name} is done; "
                    "set --data.infinite true to start another pass"
                )
            order, starts = self._epoch(epoch)
            i = int(np.searchsorted(starts, at, side="right")) - 1
            doc_start = int(self.docs.starts[order[i]]) + at - int(starts[i])
            take = min(n, int(starts[i + 1]) - at)
            out.append(self.docs.tokens[doc_start : doc_start + take])
            pos, n = pos + take, n - take
        return np.concatenate(out).astype(np.int64)


class SyntheticWindows:
    """Uniform random tokens: window w depends only on (seed, w)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed % 2**63

    def __getitem__(self, w: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, w])
        return rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)


class GlobalBatchLoader:
    """Micro-batches of (inputs, labels), (local_batch_size, seq_len) int64, for one dp rank.

    Step s reads the global batch of windows [c, c + B), c the windows consumed before it and
    B = local_batch_size x dp_degree x accumulation; micro-batch m of dp rank r is windows
    c + (m x dp_degree + r) x local_batch_size + [0, local_batch_size). One process with local
    batch B, or with accumulation, reads the same windows as any data-parallel layout.
    `accumulation` is a count, or [(first window, count)] for a batch size that ramps up.
    A window is seq_len + 1 tokens, or (tokens, labels) of that length when only some tokens are
    targets (chat.ChatWindows); labels are shifted like the tokens."""

    state_key = "global"  # every rank saves the same state, and any layout can load it

    def __init__(
        self,
        windows,
        local_batch_size: int,
        dp_rank: int,
        dp_degree: int,
        accumulation: int | list[tuple[int, int]] = 1,
    ):
        self.windows, self.local_batch_size = windows, local_batch_size
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.ramp = [(0, accumulation)] if isinstance(accumulation, int) else accumulation
        self.consumed, self.micro, self._logged = 0, 0, self.ramp[0][1]

    @property
    def accumulation(self) -> int:
        """Micro-batches in the step that reads window `consumed` on."""
        return next(n for start, n in reversed(self.ramp) if start <= self.consumed)

    @property
    def global_batch(self) -> int:
        return self.local_batch_size * self.dp_degree * self.accumulation

    def __iter__(self) -> "GlobalBatchLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.micro == 0 and self.accumulation != self._logged:
            self._logged = self.accumulation
            logger.info(f"data: from window {self.consumed} on, global batch {self.global_batch} "
                        f"({self.accumulation} micro-batches a step)")  # fmt: skip
        first = self.consumed + (self.micro * self.dp_degree + self.dp_rank) * self.local_batch_size
        rows = [self.windows[w] for w in range(first, first + self.local_batch_size)]
        self.micro += 1
        if self.micro == self.accumulation:
            self.consumed, self.micro = self.consumed + self.global_batch, 0
        if isinstance(rows[0], tuple):  # (tokens, labels) windows: chat data trains on some tokens
            tokens, labels = (torch.from_numpy(np.stack(part)) for part in zip(*rows, strict=True))
        else:
            tokens = labels = torch.from_numpy(np.stack(rows))  # (local_batch_size, seq_len + 1)
        return tokens[:, :-1], labels[:, 1:]

    def skip(self, steps: int) -> None:
        """Move on by `steps` global batches without reading them (a rollback's skip)."""
        if self.micro:
            raise DataError("the data skips whole global batches only, at a step boundary")
        for _ in range(steps):
            self.consumed += self.global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.consumed, "micro": self.micro, "seq_len": self.windows.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["micro"]:
            raise DataError(
                "the data position was saved inside a step; it resumes only at a step boundary"
            )
        consumed, seq_len = state["windows"], self.windows.seq_len
        if state["seq_len"] != seq_len:  # the same tokens read, in windows of the new length
            consumed = -(-consumed * (state["seq_len"] + 1) // (seq_len + 1))
            logger.info(
                f"data: resumed at window {consumed} of {seq_len + 1} tokens (saved "
                f"with seq_len {state['seq_len']})"
            )
        self.consumed, self.micro = consumed, 0
