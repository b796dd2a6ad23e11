"""Llama 3's tokenizer: one interface, two backends chosen by the file. A tiktoken BPE read from
a `tokenizer.model` file plus 256 special tokens (Meta's original/tokenizer.model, whose ids equal
Meta's, or titan's small shipped one), or a Hugging Face `tokenizer.json` (titan.data.hf_tokenizer);
the interface is titan.data.tokenizer_base's.
"""

import base64
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from titan.data.tokenizer_base import Tokenizer
from titan.hub import HubError, parse_hub_id, resolve_model_path
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
                f"{SHIPPED_TOKENIZER}) or a Hugging Face tokenizer.json"
            ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3's BPE from a tiktoken `tokenizer.model`; ids match Meta's for Meta's file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        ranks = load_ranks(path)
        num_base = len(ranks)
        self.special_tokens = {name: num_base + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.path = path
        self.n_words = num_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def _encode_piece(self, piece, allowed_special, disallowed_special) -> list[int]:
        return self.model.encode(
            piece, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids])


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the current directory, then in the repo root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or not (REPO_ROOT / candidate).exists():
        return candidate
    return REPO_ROOT / candidate


# In a folder, a tiktoken file wins: it is Meta's own, the ids are the same, and token files
# made with it keep matching its sha256; tokenizer.json serves folders that ship only that.
FOLDER_FILES = ("original/tokenizer.model", "tokenizer.model", "tokenizer.json")


def tokenizer_file(path: Path) -> Path | None:
    """The file `path` names: itself, or in a folder the first of FOLDER_FILES it holds."""
    if path.is_file():
        return path
    if path.is_dir():
        return next((path / n for n in FOLDER_FILES if (path / n).is_file()), None)
    return None


def locate(path: str, dry_run: bool = False) -> Path:
    """The local path `path` names (see `resolve_path`), else the hub snapshot of the repo id it
    names (titan.hub), which a dry run looks for in the hub cache only: it sends no request."""
    local = resolve_path(path)
    if local.exists() or parse_hub_id(path) is None:
        return local
    try:
        return resolve_model_path(path, "tokenizer", "model.tokenizer_path", cache_only=dry_run)
    except HubError as e:
        if not dry_run:
            raise
        logger.warning(f"dry run: {e}")
        return local


def build_tokenizer(path: str, dry_run: bool = False) -> Tokenizer:
    """Load the Llama 3 tokenizer at `path` (see `locate`): a tiktoken tokenizer.model, a
    Hugging Face tokenizer.json (told apart by content, so the name does not matter), a folder
    holding one (FOLDER_FILES), or a hub id (org/name[@revision]) of a repo holding one. A dry
    run, which checks layouts and memory and not text, takes the shipped one when `path` is
    missing."""
    resolved = tokenizer_file(locate(path, dry_run))
    if dry_run and resolved is None:
        logger.warning(f"dry run: tokenizer {path} not found, using {SHIPPED_TOKENIZER}")
        resolved = resolve_path(SHIPPED_TOKENIZER)
    if resolved is None:
        where = "" if Path(path).is_absolute() else f" (looked in {Path.cwd()} and {REPO_ROOT})"
        raise FileNotFoundError(
            f"tokenizer file not found: {path!r}{where}. "
            f"Pass --model.tokenizer_path with a hub id (meta-llama/Llama-3.1-8B), Meta's "
            f"original/tokenizer.model of a Llama 3 checkpoint, a Hugging Face tokenizer.json "
            f"or a folder holding either, or titan's "
            f"shipped {SHIPPED_TOKENIZER} (a checkout rebuilds it with "
            f"`python scripts/build_tokenizer.py`)."
        )
    with resolved.open("rb") as f:
        is_json = f.read(64).lstrip().startswith(b"{")  # base64 never holds a brace
    if is_json:
        from titan.data.hf_tokenizer import HFTokenizer  # imports `tokenizers` only when used

        return HFTokenizer(resolved)
    return TiktokenTokenizer(resolved)
