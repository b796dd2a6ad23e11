"""The tokenizer.json backend: a Hugging Face `tokenizers` file behind titan's Tokenizer interface.

Many Llama 3 derivatives ship only tokenizer.json. On Meta's vocabulary it gives tiktoken's ids:
the same regex split and byte-level BPE, and encode() here treats special-token text as tiktoken
does (plain text unless allowed), so titan's chat rendering works unchanged.
"""

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from titan.data.tokenizer_base import Tokenizer


@functools.lru_cache(maxsize=16)
def _any_of(names: frozenset[str]) -> re.Pattern:
    # Longest first, so that a token that is a prefix of another never wins over it.
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _token_name(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _template_bos(post_processor: Any) -> str | None:
    """The special token a TemplateProcessing post-processor puts first (Llama 3's BOS)."""
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        return next(filter(None, map(_template_bos, post_processor.get("processors", []))), None)
    if post_processor.get("type") != "TemplateProcessing" or not post_processor.get("single"):
        return None
    return post_processor["single"][0].get("SpecialToken", {}).get("id")


class HFTokenizer(Tokenizer):
    """A tokenizer.json read with the `tokenizers` library. Special tokens are its added tokens
    marked special; bos/eos come from tokenizer_config.json beside it (bos_token, eos_token),
    else bos from tokenizer.json's post-processor, else Llama 3's <|begin_of_text|> and
    <|end_of_text|>."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            self.model = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception
            raise ValueError(
                f"{path} is not a tokenizer.json the tokenizers library reads ({e}); pass a "
                "Hugging Face tokenizer.json or a tiktoken tokenizer.model"
            ) from e
        # Special-token text is encoded as plain text; encode() cuts out the allowed ones.
        self.model.encode_special_tokens = True
        added = self.model.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.n_words = max(self.model.get_vocab(with_added_tokens=True).values()) + 1
        self.path = path
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        raw = json.loads(path.read_text())
        bos = _token_name(config.get("bos_token")) or _template_bos(raw.get("post_processor"))
        eos = _token_name(config.get("eos_token"))
        self.bos_id = self._id(bos or "<|begin_of_text|>", "bos_token")
        self.eos_id = self._id(eos or "<|end_of_text|>", "eos_token")
        self.eot_id = self.special_tokens.get("<|eot_id|>", self.eos_id)
        pad = _token_name(config.get("pad_token")) or "<|finetune_right_pad_id|>"
        self.pad_id = self.special_tokens.get(pad, self.eos_id)

    def _id(self, name: str, what: str) -> int:
        token_id = self.model.token_to_id(name)
        if token_id is None:
            raise ValueError(
                f"{self.path}: {what} {name!r} is not in its vocabulary; set {what} in "
                "tokenizer_config.json beside it to one of its special tokens"
            )
        return token_id

    def _plain(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False).ids if text else []

    def _encode_piece(self, piece, allowed_special, disallowed_special) -> list[int]:
        # tiktoken's rules: "all" means every special token; disallowed "all" means every one
        # not allowed; disallowed text is an error, allowed text is the special token's id.
        every = frozenset(self.special_tokens)
        allowed = every if allowed_special == "all" else frozenset(allowed_special) & every
        disallowed = (
            every - allowed if disallowed_special == "all" else frozenset(disallowed_special)
        )
        if disallowed and (found := _any_of(disallowed).search(piece)):
            raise ValueError(
                f"text holds the special token {found.group()!r}, which is disallowed: pass it "
                "in allowed_special, or leave disallowed_special empty to encode it as text"
            )
        if not allowed:
            return self._plain(piece)
        ids, start = [], 0
        for found in _any_of(allowed).finditer(piece):
            ids += self._plain(piece[start : found.start()])
            ids.append(self.special_tokens[found.group()])
            start = found.end()
        return ids + self._plain(piece[start:])

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=False)
