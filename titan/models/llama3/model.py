"""Llama 3 as a plain nn.Module: pre-norm RMSNorm blocks of GQA attention and a SwiGLU FFN.

tokens -> tok_embeddings -> n_layers x [h += attention(attention_norm(h));
h += feed_forward(ffn_norm(h))] -> norm -> output -> logits. RoPE (theta 500000, Llama 3.1
frequency scaling) rotates q and k with real cos/sin tables on Meta's interleaved (even, odd)
pairs. Names follow Meta's checkpoints.
With attn_mask_type "block_causal", forward also takes each token's document index and a token
attends only to earlier tokens of its own document (flex attention on CUDA, a masked SDPA that
computes the same function elsewhere); RoPE positions stay those of the window, which changes
nothing: attention scores depend only on the distance between two tokens.
Build on the meta device, move with `to_empty(device=...)`, then call `init_weights()`.
A pipeline stage is this module with the parts it does not own deleted (blocks removed from
`layers`; tok_embeddings, norm and output set to None): it then maps hidden states in or out.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from titan.models.llama3.args import ModelArgs, RoPEScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RoPEScaling | None) -> torch.Tensor:
    """Rotation frequency of each (even, odd) pair, with Llama 3.1 scaling when given."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return freqs.float()
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, interpolated)
    scaled = torch.where(wavelen < high_freq_wavelen, freqs, scaled)
    return scaled.float()


def rope_cache(
    head_dim: int, max_seq_len: int, theta: float, scaling: RoPEScaling | None
) -> torch.Tensor:
    """cos and sin of every position's angles: (max_seq_len, head_dim // 2, 2)."""
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x by its position's angle.

    x: (bs, seqlen, n_heads, head_dim); cache: (seqlen, head_dim // 2, 2) of cos, sin.
    """
    # FSDP with bf16 parameters casts every floating block input to bf16, this table included:
    # rotate in fp32 whatever its dtype (as transformers does, from bf16 cos/sin).
    cache = cache.float()
    if not torch.compiler.is_compiling():
        # Eager: one complex multiply is ~5x faster than the real formulation on CPU.
        rot = torch.view_as_complex(cache)[None, :, None, :]  # (1, seqlen, 1, head_dim // 2)
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
    # Compiled: inductor cannot fuse complex ops, but fuses this into one kernel.
    xf = x.float().unflatten(-1, (-1, 2))  # (bs, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos = cache[None, :, None, :, 0]  # (1, seqlen, 1, head_dim // 2)
    sin = cache[None, :, None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


AttentionMask = torch.Tensor | BlockMask | None  # None: causal
KVCacheFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def attention_mask(
    q_positions: torch.Tensor,
    kv_positions: torch.Tensor,
    q_documents: torch.Tensor | None,
    kv_documents: torch.Tensor | None,
    flex: bool,
) -> torch.Tensor | BlockMask:
    """Which keys each query may attend to: those at its position or before (causal) and, given
    documents, in its own document. positions and documents: (bs, seqlen) ints for the queries
    and the keys (the same tensors, unless context parallel gathered the keys from other ranks,
    in any order). Returns flex attention's BlockMask (which skips all-masked blocks), or a
    (bs, 1, q_len, kv_len) boolean mask for scaled_dot_product_attention."""
    if flex:

        def allowed(b, _h, q, kv):
            causal = q_positions[b, q] >= kv_positions[b, kv]
            if q_documents is None:
                return causal
            return causal & (q_documents[b, q] == kv_documents[b, kv])

        bs, q_len = q_positions.shape
        kv_len = kv_positions.shape[1]
        return create_block_mask(allowed, bs, None, q_len, kv_len, device=q_positions.device)
    mask = q_positions[:, :, None] >= kv_positions[:, None, :]  # (bs, q_len, kv_len)
    if q_documents is not None:
        mask = mask & (q_documents[:, :, None] == kv_documents[:, None, :])
    return mask[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask):
    """q: (bs, n_heads, seqlen, head_dim), k and v: (bs, n_kv_heads, seqlen, head_dim)."""
    # GQA: each kv head serves n_heads // n_kv_heads query heads, without copying k and v
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@torch.no_grad()
def trunc_normal_(weight: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> None:
    """Fill weight with N(0, std) draws, drawing again those outside [a, b] until none is.

    titan's own, so that a seed starts the same weights on every torch it runs on: torch 2.13+'s
    nn.init.trunc_normal_ samples like this for such wide bounds, 2.11's by the inverse normal
    CDF (other values for the same seed)."""
    if weight.is_meta:
        return
    lo, hi = (weight.new_tensor(x, device="cpu").item() for x in (a, b))  # in weight's dtype
    drawn = weight.normal_(0.0, std)
    while (outside := (drawn < lo) | (drawn > hi)).any():
        drawn = torch.where(outside, torch.empty_like(drawn).normal_(0.0, std), drawn)
    if drawn is not weight:
        weight.copy_(drawn)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalize in fp32 whatever the compute dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # context parallel (set by apply_cp), one of: causal attention of this rank's queries
        # over every cp rank's keys (q, k, v -> out), or an all-gather of a tensor along a dim
        # over the cp ranks (keys and values for a masked attention)
        self.ring_attention: Callable[..., torch.Tensor] | None = None
        self.context_gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        # generation's KV cache (set by titan.models.llama3.generation): takes this call's keys and
        # values (bs, n_kv_heads, seqlen, head_dim), after RoPE, and returns every cached one so
        # far; the caller then passes an explicit mask, as is_causal would align it top-left
        self.kv_cache: KVCacheFn | None = None

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask = None
    ) -> torch.Tensor:
        """x: (bs, seqlen, dim); rope: the cos/sin table from position 0, at least seqlen long;
        mask: see attention_mask (None: causal)."""
        bs, seqlen, _ = x.shape
        # The table is cut here, to the sequence attention sees: a pipeline stage after the
        # first receives hidden states that sequence parallel has sharded, and only attention's
        # input is the whole sequence again.
        rope = rope[:seqlen]
        # -1 rather than n_heads: under tensor parallel each rank holds a slice of the heads
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bs, heads, seqlen, head_dim)
        if self.kv_cache is not None:  # (bs, n_kv_heads, cached + seqlen, head_dim)
            k, v = self.kv_cache(k, v)
        if self.ring_attention is not None:
            out = self.ring_attention(q, k, v)
        else:
            if self.context_gather is not None:  # every cp rank's keys: (bs, heads, cp x seqlen, .)
                k, v = self.context_gather(k, 2), self.context_gather(v, 2)
            out = attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(bs, seqlen, -1)  # (bs, seqlen, n_heads * head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Output projections of deeper blocks start smaller so the residual stream stays O(1).
        self.out_init_std = 0.02 / math.sqrt(2 * (layer_id + 1))

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        for lin in (self.attention.wq, self.attention.wk, self.attention.wv, self.feed_forward.w1):
            trunc_normal_(lin.weight, std=0.02)
        for lin in (self.attention.wo, self.feed_forward.w2, self.feed_forward.w3):
            trunc_normal_(lin.weight, std=self.out_init_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from args, rebuilt by init_weights() after to_empty().
        cache = rope_cache(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("rope_cache", cache, persistent=False)
        # context parallel with block_causal (set by apply_cp): gathers the positions and
        # documents of every cp rank's keys
        self.context_gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def forward(
        self,
        tokens: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (bs, seqlen) int64 -> logits: (bs, seqlen, vocab_size). document_ids:
        (bs, seqlen), each token's document, for attn_mask_type "block_causal". positions:
        (bs, seqlen), each token's position in its window (default 0, 1, ...; context parallel
        gives each rank parts of the window). mask: (bs, 1, seqlen, kv_len) bool, which keys
        each query may see, instead of the causal or document mask (generation: left padding
        and a KV cache). A pipeline stage without tok_embeddings takes hidden states
        (bs, seqlen, dim) instead, and one without output returns them."""
        rope = self.rope_cache
        if positions is not None:
            rope = rope[positions[0]]  # every row of a batch has the same positions
        elif tokens.shape[1] > rope.shape[0]:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {len(rope)}")
        block = self.args.attn_mask_type == "block_causal"
        if mask is None:
            if block and document_ids is None:
                raise ValueError("attn_mask_type 'block_causal' needs each token's document_ids")
            if block or self.context_gather is not None:
                mask = self._mask(document_ids if block else None, positions)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, rope, mask)  # (bs, seqlen, dim)
        if self.output is None:
            return h
        return self.output(self.norm(h))

    def _mask(self, documents: torch.Tensor | None, positions: torch.Tensor | None):
        """The attention mask (see attention_mask) of this rank's queries over all keys."""
        if positions is None:  # documents given: the window in order
            bs, seqlen = documents.shape
            positions = torch.arange(seqlen, device=documents.device).expand(bs, seqlen)
        kv_positions, kv_documents = positions, documents
        if self.context_gather is not None:
            kv_positions = self.context_gather(positions, 1)
            if documents is not None:
                kv_documents = self.context_gather(documents, 1)
        flex = positions.device.type == "cuda"
        return attention_mask(positions, kv_positions, documents, kv_documents, flex)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "Transformer":
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_word_embeddings and self.output is not None:
            # to_empty gives each module a new tensor: re-tie
            self.output.weight = self.tok_embeddings.weight
        return self

    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Rebuild the RoPE cache, a buffer derived from args (after to_empty() from meta)."""
        args = self.args
        with torch.device(buffer_device or self.rope_cache.device):
            self.rope_cache = rope_cache(
                args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling
            )

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize every parameter and rebuild the RoPE cache (after to_empty() from meta)."""
        args = self.args
        self.init_buffers(buffer_device)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        # Tied: one matrix serves as embedding and output, so it takes the output's scale.
        final_std = args.dim**-0.5
        if self.tok_embeddings is not None and not args.tie_word_embeddings:
            nn.init.normal_(self.tok_embeddings.weight)
        if self.output is not None:
            trunc_normal_(self.output.weight, std=final_std, a=-3 * final_std, b=3 * final_std)
