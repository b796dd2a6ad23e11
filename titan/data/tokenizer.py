"""Llama 3's tokenizer: a tiktoken BPE read from a `tokenizer.model` file plus 256 special tokens.

Works on Meta's original/tokenizer.model (ids equal Meta's) and on titan's small shipped one.
"""

import base64
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from titan.logger import logger

# Llama 3's pre-tokenizer: contractions, letter runs with one leading non-letter, 1-3 digits,
# punctuation runs, newlines, and whitespace (a run before a word keeps its last space for it).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# Meta's named special tokens, in Meta's order; reserved tokens fill the rest of the 256.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
SHIPPED_TOKENIZER = "titan/assets/tokenizer/tokenizer.model"
REPO_ROOT = Path(__file__).resolve().parents[2]

# tiktoken's Rust regex engine panics on very long inputs and on very long runs of whitespace
# or non-whitespace, so encode() cuts the text first, at the same places Meta's tokenizer does
# (so ids stay equal to Meta's on any input). Stdlib `re`'s \s is exactly str.isspace(), which
# Meta's cut uses; the `regex` package's \s differs on U+001C..U+001F.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# The lookbehinds anchor a match at the start of a run, which keeps the scan linear in the text.
_LONG_RUN = re.compile(r"(?<!\s)\s{N,}|(?<!\S)\S{N,}".replace("N", str(MAX_RUN_CHARS + 1)))


def special_token_names() -> list[str]:
    """All 256 special tokens in id order (id = number of base ranks + position)."""
    n_reserved = NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + n_reserved)]
    return NAMED_SPECIAL_TOKENS + reserved


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token bytes) rank` line per token, ranks 0..N-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(
                f"{path}:{lineno} is not a tiktoken BPE line ('base64 rank'); a Llama 3 "
                f"tokenizer.model is expected (Meta's original/tokenizer.model or "
                f"{SHIPPED_TOKENIZER}), not a Hugging Face tokenizer.json"
            ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


def _split_long_runs(text: str) -> Iterator[str]:
    # Cut every whitespace or non-whitespace run longer than MAX_RUN_CHARS after each
    # MAX_RUN_CHARS characters of it.
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer:
    """Encode and decode text with Llama 3's BPE; ids match Meta's for Meta's file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        ranks = load_ranks(path)
        num_base = len(ranks)
        self.special_tokens: dict[str, int] = {
            name: num_base + i for i, name in enumerate(special_token_names())
        }
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.path = path
        self.n_words: int = num_base + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]

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
                ids += self.model.encode(
                    piece, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (a list, tensor or array); bytes that are not valid UTF-8 become U+FFFD."""
        return self.model.decode([int(i) for i in ids])


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the current directory, then in the repo root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or not (REPO_ROOT / candidate).exists():
        return candidate
    return REPO_ROOT / candidate


def build_tokenizer(path: str, dry_run: bool = False) -> Tokenizer:
    """Load the Llama 3 tokenizer at `path` (see `resolve_path`); a dry run, which checks
    layouts and memory and not text, takes the shipped one when `path` is missing."""
    resolved = resolve_path(path)
    if dry_run and not resolved.is_file():
        logger.warning(f"dry run: tokenizer {path} not found, using {SHIPPED_TOKENIZER}")
        resolved = resolve_path(SHIPPED_TOKENIZER)
    if not resolved.is_file():
        where = "" if Path(path).is_absolute() else f" (looked in {Path.cwd()} and {REPO_ROOT})"
        raise FileNotFoundError(
            f"tokenizer file not found: {path!r}{where}. "
            f"Pass --model.tokenizer_path with Meta's original/tokenizer.model of a Llama 3 "
            f"checkpoint, or titan's shipped {SHIPPED_TOKENIZER} (a checkout rebuilds it with "
            f"`python scripts/build_tokenizer.py`)."
        )
    return Tokenizer(resolved)
