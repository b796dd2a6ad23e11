"""The interface of titan's tokenizers (encode, decode, ids of the special tokens), shared by the
tiktoken backend (titan.data.tokenizer) and the tokenizer.json one (titan.data.hf_tokenizer), and
the cuts encode() makes in long text, which both make so that their ids stay equal.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

# tiktoken's Rust regex engine panics on very long inputs and on very long runs of whitespace
# or non-whitespace, so encode() cuts the text first, at the same places Meta's tokenizer does
# (so ids stay equal to Meta's on any input). Stdlib `re`'s \s is exactly str.isspace(), which
# Meta's cut uses; the `regex` package's \s differs on U+001C..U+001F.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# The lookbehinds anchor a match at the start of a run, which keeps the scan linear in the text.
_LONG_RUN = re.compile(r"(?<!\s)\s{N,}|(?<!\S)\S{N,}".replace("N", str(MAX_RUN_CHARS + 1)))


def _split_long_runs(text: str) -> Iterator[str]:
    # Cut every whitespace or non-whitespace run longer than MAX_RUN_CHARS after each
    # MAX_RUN_CHARS characters of it.
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer(ABC):
    """What titan uses of a tokenizer, whichever the backend: `encode`, `decode`, `n_words`,
    `special_tokens` (name -> id), `bos_id`, `eos_id`, `eot_id`, `pad_id` and `path` (the file
    read, whose sha256 token files record). Both backends give the same ids for one vocabulary."""

    path: Path
    n_words: int
    special_tokens: dict[str, int]
    bos_id: int
    eos_id: int
    eot_id: int
    pad_id: int

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: set[str] | frozenset[str] | str = frozenset(),
        disallowed_special: set[str] | frozenset[str] | tuple[()] | str = (),
    ) -> list[int]:
        """Token ids of `s`. Text that spells a special token is plain text unless it is in
        `allowed_special` ("all" allows all); `disallowed_special` makes such text an error."""
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[i : i + MAX_ENCODE_CHARS]):
                ids += self._encode_piece(piece, allowed_special, disallowed_special)
        if eos:
            ids.append(self.eos_id)
        return ids

    @abstractmethod
    def _encode_piece(
        self,
        piece: str,
        allowed_special: set[str] | frozenset[str] | str,
        disallowed_special: set[str] | frozenset[str] | tuple[()] | str,
    ) -> list[int]:
        """Ids of one piece of at most MAX_ENCODE_CHARS, its runs already cut (see encode)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (a list, tensor or array); bytes that are not valid UTF-8 become U+FFFD."""
