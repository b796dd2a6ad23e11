"""Chat examples for supervised finetuning (data.format = "chat"): messages rendered in Llama 3's
chat template, assistant tokens the only targets, whole examples packed into windows (or one a
window) that carry their own labels and are read by global index like PackedWindows. Rendered
at start-up, or memory-mapped from the files `titan-preprocess --format chat` writes.
"""

import bisect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from titan.data.tokenizer import Tokenizer
from titan.data.tokens import (
    IGNORE_INDEX,
    TokenDocuments,
    _worker_tokenizer,
    read_metadata,
    token_dtype,
)
from titan.errors import DataError
from titan.logger import logger

ROLES = ("system", "user", "assistant")
# What render_chat makes of an example, recorded in preprocessed chat files: change it whenever
# the tokens or targets it renders change, so that files rendered the old way are refused.
TEMPLATE = "llama3-chat-v1: content stripped; targets: assistant content and its <|eot_id|>"


def check_example(example: Any, index: int, field: str, name: str) -> list[dict[str, str]]:
    """The example's messages, or a one-line DataError naming the example and what is wrong."""
    where = f"{name}: example {index}"
    example = example if isinstance(example, dict) else {}
    messages = example.get(field)
    if messages is None:  # absent, or null in a file where other rows have it
        fields = sorted(k for k, v in example.items() if v is not None)
        has = f" (it has {fields})" if fields else ""
        raise DataError(f"{where} has no {field!r} field{has}; name the messages column with "
                        "--data.messages_field")  # fmt: skip
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}}, "
                        f"not {type(messages).__name__} {str(messages)[:60]!r}")  # fmt: skip
    for m, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}, message {m}: role {role!r} is not one of "
                            f"{', '.join(ROLES)}")  # fmt: skip
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}, message {m} ({role}): content is "
                            f"{type(content).__name__}, not a string")  # fmt: skip
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where} has no assistant message: nothing to train on")
    return messages


def render_chat(messages: list[dict[str, str]], tokenizer: Tokenizer) -> tuple[list, list]:
    """(token ids, which are targets) of `<|begin_of_text|>` then, per message,
    `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`; the targets are each
    assistant message's content and its <|eot_id|>. Content that spells a special token stays
    text (the tokenizer's default); surrounding whitespace is stripped, as Meta's original
    llama3 repository and Hugging Face's template do (llama-models' chat_format does not)."""
    special = tokenizer.special_tokens
    start, end = special["<|start_header_id|>"], special["<|end_header_id|>"]
    # "\n\n" is encoded apart from the content: a generation prompt ends with it alone
    # (titan-generate --chat), and the model must learn the content that follows it
    newlines = tokenizer.encode("\n\n", bos=False, eos=False)
    ids, targets = [tokenizer.bos_id], [False]
    for message in messages:
        role = tokenizer.encode(message["role"], bos=False, eos=False)
        header = [start, *role, end, *newlines]
        content = tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        body = [*content, tokenizer.eot_id]
        ids += header + body
        targets += [False] * len(header) + [message["role"] == "assistant"] * len(body)
    return ids, targets


def chat_prompt(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[int]:
    """The token ids that ask for the next assistant message (generation's --chat): the messages
    rendered as in training (render_chat), then the assistant's header."""
    special = tokenizer.special_tokens
    role = tokenizer.encode("assistant", bos=False, eos=False)
    newlines = tokenizer.encode("\n\n", bos=False, eos=False)
    header = [special["<|start_header_id|>"], *role, special["<|end_header_id|>"], *newlines]
    return render_chat(messages, tokenizer)[0] + header


def render_example(
    example: Any, index: int, field: str, name: str, tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, targets as bools) of one row, checked: the arrays ChatExamples holds, whether
    rendered at start-up or by titan-preprocess's workers."""
    ids, targets = render_chat(check_example(example, index, field, name), tokenizer)
    return np.asarray(ids, dtype=token_dtype(tokenizer.n_words)), np.asarray(targets, dtype=bool)


def encode_chats(task: tuple[str, str, str, int, list]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokenizer path, messages field, input name, index of the first row, rows) -> each row's
    render_example: a worker's task in titan-preprocess --format chat."""
    path, field, name, first, rows = task
    tok = _worker_tokenizer(path)
    return [render_example(row, first + i, field, name, tok) for i, row in enumerate(rows)]


class ChatExamples(TokenDocuments):
    """Rendered examples in one token array (as TokenDocuments' documents), plus `targets`: a
    bool per token, true where the token is trained on."""

    KIND = "chat"
    targets: np.ndarray

    @classmethod
    def from_rows(
        cls, name: str, n: int, row: Callable[[int], Any], field: str, tokenizer: Tokenizer
    ) -> "ChatExamples":
        """Check and render rows 0..n-1 now."""
        if n > 100_000:
            logger.info(f"data: rendering and tokenizing {n:,} chat examples of {name} at "
                        "start-up")  # fmt: skip
        dtype = token_dtype(tokenizer.n_words)
        ids, targets = [], []  # an array per example: a few bytes a token, not a Python int
        for i in range(n):
            one_ids, one_targets = render_example(row(i), i, field, name, tokenizer)
            ids.append(one_ids)
            targets.append(one_targets)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(one) for one in ids], out=offsets[1:])
        examples = cls(name, np.concatenate(ids) if n else np.zeros(0, dtype), offsets)
        examples.targets = np.concatenate(targets) if n else np.zeros(0, dtype=bool)
        return examples

    @classmethod
    def load(cls, prefix: str, tokenizer: Tokenizer, vocab_size: int) -> "ChatExamples":
        """Memory-map PREFIX.bin/.idx/.targets of titan-preprocess --format chat: checked as
        text files are (TokenDocuments.load: kind, sizes, tokenizer), then the template."""
        examples = super().load(prefix, tokenizer, vocab_size)
        meta = read_metadata(prefix)
        if meta.get("chat_template") != TEMPLATE:
            raise DataError(f"--data.path {prefix} was rendered with chat template "
                            f"{meta.get('chat_template')!r}, not this titan's {TEMPLATE!r}: "
                            "preprocess the data again")  # fmt: skip
        path = Path(f"{prefix}.targets")
        if not path.is_file():
            raise DataError(f"{path} is missing (written with {prefix}.json by titan-preprocess "
                            "--format chat): preprocess the data again")  # fmt: skip
        if path.stat().st_size != meta["n_tokens"]:
            raise DataError(f"{path} has {path.stat().st_size:,} bytes, not the "
                            f"{meta['n_tokens']:,} (a byte a token) that {prefix}.json records: "
                            "truncated or from another run; preprocess again")  # fmt: skip
        examples.targets = np.memmap(path, dtype=np.bool_, mode="r")
        return examples

    def n_targets(self) -> int:
        """The target tokens of these examples, summed over the runs of the token array between
        example bounds: no per-token running sum of a memory-mapped corpus."""
        ends = self.starts + self.lengths
        bounds = np.unique(np.concatenate([self.starts, ends]))
        bounds = bounds[bounds < len(self.targets)]
        if len(bounds) == 0:
            return 0
        runs = np.add.reduceat(self.targets, bounds, dtype=np.int64)  # run k: bounds k to k + 1
        before = np.concatenate([[0], np.cumsum(runs)])  # targets from bounds[0] to each bound
        at = lambda points: before[np.searchsorted(bounds, points)]  # noqa: E731
        return int((at(ends) - at(self.starts)).sum())


class ChatWindows:
    """Window w: (tokens, labels), seq_len + 1 int64 each, labels = the token where it is a target
    and IGNORE_INDEX elsewhere (prompts, headers, BOS, padding). Each epoch orders the examples
    (drawn from (seed, epoch) when shuffling) and packs them greedily in that order: an example
    joins the current window if it fits, else starts the next (packing = false: one a window);
    the rest of a window is pad_id. An example longer than a window keeps its first seq_len + 1
    tokens."""

    def __init__(
        self,
        examples: ChatExamples,
        seq_len: int,
        pad_id: int,
        seed: int,
        shuffle: bool,
        infinite: bool,
        packing: bool,
    ):
        if examples.n_docs == 0:
            raise DataError(f"{examples.name} has no examples")
        self.docs, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.seed, self.shuffle, self.infinite = seed % 2**63, shuffle, infinite
        self.packing = packing
        self.lengths = np.minimum(examples.lengths, seq_len + 1)
        self.n_truncated = int((examples.lengths > seq_len + 1).sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows_before = [0]  # windows in the epochs before epoch e, for e computed so far

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(example order, where each window starts in it, then the order's length)."""
        if epoch not in self._epochs:
            order = np.arange(self.docs.n_docs)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.docs.n_docs)
            firsts = self._pack(self.lengths[order])
            if len(self._epochs) > 1:  # windows move forward: keep this epoch and the last
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, firsts)
        return self._epochs[epoch]

    def _pack(self, lengths: np.ndarray) -> np.ndarray:
        if not self.packing:
            return np.arange(len(lengths) + 1)
        firsts, used = [0], 0
        for i, n in enumerate(lengths.tolist()):
            if used + n > self.seq_len + 1:
                firsts.append(i)
                used = 0
            used += n
        firsts.append(len(lengths))
        return np.asarray(firsts)

    def windows_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1]) - 1

    def _locate(self, w: int) -> tuple[int, int]:
        """(epoch, window within it) of window w."""
        while self._windows_before[-1] <= w:
            epoch = len(self._windows_before) - 1
            if epoch > 0 and not self.infinite:
                raise DataError(f"ran out of data: one pass over {self.docs.name} is done; set "
                                "--data.infinite true to start another pass")  # fmt: skip
            self._windows_before.append(self._windows_before[-1] + self.windows_in_epoch(epoch))
        epoch = bisect.bisect_right(self._windows_before, w) - 1
        return epoch, w - self._windows_before[epoch]

    def __getitem__(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, k = self._locate(w)
        order, firsts = self._epoch(epoch)
        tokens = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len + 1, IGNORE_INDEX, dtype=np.int64)
        at = 0
        for i in order[firsts[k] : firsts[k + 1]]:
            start, n = int(self.docs.starts[i]), int(self.lengths[i])
            piece = self.docs.tokens[start : start + n].astype(np.int64)
            tokens[at : at + n] = piece
            targets = self.docs.targets[start : start + n]
            labels[at : at + n] = np.where(targets, piece, IGNORE_INDEX)
            at += n
        return tokens, labels
