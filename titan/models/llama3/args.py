"""Llama 3 architecture arguments and the flavors (sizes) titan trains.

Sizes follow Meta's params.json for each release; derived sizes are computed in __post_init__.
"""

from dataclasses import dataclass


@dataclass
class RoPEScaling:
    """Llama 3.1 frequency scaling: long wavelengths are slowed by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention
    vocab_size: int = 128256
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RoPEScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    # "causal", or "block_causal": no attention across the documents packed into one sequence
    attn_mask_type: str = "causal"
    # derived in __post_init__
    head_dim: int = 0
    ffn_hidden_dim: int = 0

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        self.head_dim = self.dim // self.n_heads
        # Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        self.ffn_hidden_dim = self.multiple_of * (
            (hidden + self.multiple_of - 1) // self.multiple_of
        )


_LLAMA31_SCALING = RoPEScaling(factor=8.0)
_LLAMA32_SCALING = RoPEScaling(factor=32.0)

FLAVORS: dict[str, ModelArgs] = {
    # Tiny, for CPU tests: vocab matches titan's shipped 2,304-token tokenizer.
    "debugmodel": ModelArgs(
        dim=256,
        n_layers=6,
        n_heads=16,
        n_kv_heads=4,
        vocab_size=2304,
        multiple_of=256,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=2048,
    ),
    # Llama 3.2 (tied embeddings)
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    "3B": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    # Llama 3.1
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "405B": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
}
