"""Streamed documents (a Hugging Face IterableDataset, one shard per dp rank) packed into
windows: the one source titan cannot read by global index. The position resumes exactly under
the same data-parallel degree.
"""

from typing import Any

import torch
from torch.utils.data import IterableDataset

from titan.data.tokenizer import Tokenizer
from titan.errors import DataError
from titan.logger import logger


class DocumentSource:
    """An endless or one-pass stream of document texts for one dp rank, with a resumable state."""

    def __init__(self, name: str, infinite: bool):
        self.name = name
        self.infinite = infinite
        self.epoch = 0

    def next_text(self) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _end_pass(self, empty: bool) -> None:
        """Start the next pass, or explain why there is none."""
        if empty:
            raise DataError(f"{self.name} has no documents for this data-parallel rank")
        if not self.infinite:
            raise DataError(
                f"ran out of data: pass {self.epoch + 1} over {self.name} is done; "
                f"set --data.infinite true to start another pass"
            )
        self.epoch += 1
        logger.info(f"data: starting pass {self.epoch + 1} over {self.name}")


def document_text(example: dict[str, Any], field: str, name: str) -> str:
    if field not in example:
        raise DataError(
            f"{name} has no column {field!r}; its columns are {sorted(example)}. "
            f"Pick one with --data.text_field"
        )
    text = example[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{name}: column {field!r} holds {type(text).__name__}, not text")
    return text


class _StreamSource(DocumentSource):
    """A Hugging Face IterableDataset, resumed through its own state_dict()."""

    def __init__(self, name: str, dataset: Any, text_field: str, infinite: bool):
        super().__init__(name, infinite)
        self.dataset = dataset
        self.text_field = text_field
        self._iter = None
        self._started = False  # the current pass has yielded an example since (re)starting
        self._resume: dict[str, Any] | None = None  # HF state the current pass starts from

    def next_text(self) -> str:
        while True:
            if self._iter is None:
                self.dataset.set_epoch(self.epoch)
                self.dataset.load_state_dict(self._resume)  # None clears a state loaded earlier
                self._iter = iter(self.dataset)
            try:
                example = next(self._iter)
            except StopIteration:
                self._end_pass(empty=not self._started and self._resume is None)
                self._iter, self._started, self._resume = None, False, None
                continue
            self._started = True
            return document_text(example, self.text_field, self.name)

    def state_dict(self) -> dict[str, Any]:
        hf_state = self.dataset.state_dict() if self._started else self._resume
        return {"epoch": self.epoch, "hf": hf_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._resume = state["epoch"], state["hf"]
        self._iter, self._started = None, False


class PackedTextDataset(IterableDataset):
    """Yields (inputs, labels) of seq_len tokens cut from the stream BOS doc EOS BOS doc EOS ...

    The state is the source's state before the current document plus the tokens of it already
    emitted, so a resumed loader re-reads one document instead of storing a token buffer.
    """

    def __init__(
        self, source: DocumentSource, tokenizer: Tokenizer, seq_len: int, dp: tuple[int, int]
    ):
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.dp = dp  # (rank, degree): a state only fits the shard it was saved from
        self._doc_state: dict[str, Any] | None = None  # source state before the current doc
        self._tokens: list[int] = []
        self._offset = 0  # tokens of the current document already emitted
        self._reread = False  # after load_state_dict: re-read the current document first

    def _next_document(self) -> None:
        self._doc_state = self.source.state_dict()
        text = self.source.next_text()
        self._tokens = self.tokenizer.encode(text, bos=True, eos=True)
        self._offset = 0

    def _window(self) -> list[int]:
        if self._reread:
            offset = self._offset
            self.source.load_state_dict(self._doc_state)
            self._next_document()
            self._offset, self._reread = offset, False
        window: list[int] = []
        while len(window) < self.seq_len + 1:
            if self._offset >= len(self._tokens):
                self._next_document()
            piece = self._tokens[self._offset : self._offset + self.seq_len + 1 - len(window)]
            window += piece
            self._offset += len(piece)
        return window

    def __iter__(self):
        while True:
            window = torch.tensor(self._window(), dtype=torch.long)  # (seq_len + 1,)
            yield window[:-1], window[1:]

    def state_dict(self) -> dict[str, Any]:
        source = self._doc_state if self._doc_state is not None else self.source.state_dict()
        return {"source": source, "offset": self._offset, "dp": list(self.dp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_dp(state, self.dp)
        self._doc_state, self._offset = state["source"], state["offset"]
        self._tokens, self._reread = [], True


def _check_dp(state: dict[str, Any], dp: tuple[int, int]) -> None:
    if tuple(state["dp"]) != tuple(dp):
        raise DataError(
            f"dataloader state was saved by dp rank {state['dp'][0]} of {state['dp'][1]}, "
            f"but this is rank {dp[0]} of {dp[1]}: a data-parallel size change cannot resume "
            f"the data exactly (exclude 'dataloader' from loading to start the data afresh)"
        )


def stack_windows(
    samples: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = zip(*samples, strict=True)
    return torch.stack(inputs), torch.stack(labels)  # (local_batch_size, seq_len) each
