"""Text generation with a KV cache: left-padded prompt batches, greedy / temperature / top-k /
top-p sampling from a seeded generator, a stop per row, prefill and decode timings. Works on a
tensor-parallel model too (logits replicated; rank 0's tokens are broadcast).
"""

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from titan.models.llama3.model import Transformer


@dataclass
class Sampling:
    """How the next token is picked from the logits."""

    temperature: float = 0.6  # logits are divided by it; 0: greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens only; 0: all
    top_p: float = 0.9  # among the smallest set of tokens whose probability reaches p; 1: all

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no top-p filter), got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (bs, vocab) with -inf for the tokens outside the top k (0: none) and outside the
    smallest set, most likely first, whose probability reaches top_p (1: none)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (bs, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.float().softmax(-1)
        # a token is dropped once the tokens ranked above it reach top_p (the first never is)
        drop_ranked = probs.cumsum(-1) - probs >= top_p
        drop = torch.empty_like(drop_ranked).scatter_(-1, order, drop_ranked)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of logits (bs, vocab) -> (bs,). `generator`: on logits' device."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class KVCache:
    """One attention layer's keys and values in slots 0..max_len-1, shared by every row."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # slots filled
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (bs, n_kv_heads, seqlen, head_dim); return all stored (.., length, ..)."""
        if self.k is None:  # sized from the first keys: under TP a rank holds some heads only
            bs, heads, _, head_dim = k.shape
            self.k = k.new_empty(bs, heads, self.max_len, head_dim)
            self.v = v.new_empty(bs, heads, self.max_len, head_dim)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots cannot take {end} positions")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


@contextmanager
def kv_caches(model: Transformer, max_len: int) -> Iterator[list[KVCache]]:
    """Give every attention layer a fresh KV cache of max_len slots for the body."""
    caches = [KVCache(max_len) for _ in model.layers]
    for layer, cache in zip(model.layers.values(), caches, strict=True):
        layer.attention.kv_cache = cache
    try:
        yield caches
    finally:
        for layer in model.layers.values():
            layer.attention.kv_cache = None


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, real) of shape (bs, longest prompt): each prompt right-aligned after pad_id
    tokens, and which tokens are the prompt's."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p) :] = torch.tensor(p)
        real[row, longest - len(p) :] = True
    return tokens.to(device), real.to(device)


def prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """(bs, 1, L, L) bool: each query sees the prompt tokens up to itself. A pad query sees
    itself only: some SDPA kernels give NaN for a query with no key (torch's CPU ones give 0),
    which 0 x NaN would carry into the real rows' attention of the next layer."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    mask = causal & real[:, None, :]  # (bs, L, L)
    mask |= torch.eye(length, dtype=torch.bool, device=real.device)
    return mask[:, None]


def check_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_seq_len:
        raise ValueError(
            f"the longest prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_seq_len {max_seq_len}"
        )


@dataclass
class Generation:
    """What `generate` made, and how fast."""

    tokens: torch.Tensor  # (bs, steps) new ids: a row's stop token kept, pad_id after it
    lengths: list[int]  # new tokens of each row, its stop token included
    stopped: list[bool]  # whether each row ended at a stop token
    prefill_tokens: int  # prompt tokens, padding excluded
    prefill_s: float
    decode_tokens: int  # tokens sampled from decode steps' logits (a row's first: prefill's)
    decode_s: float  # decode steps, and sampling every token
    logits: list[torch.Tensor] = field(default_factory=list)  # (bs, vocab) per step, if kept

    def completion(self, row: int) -> list[int]:
        """The new tokens of `row`, without its stop token."""
        return self.tokens[row, : self.lengths[row] - self.stopped[row]].tolist()


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    *,
    pad_id: int,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    tp_mesh: DeviceMesh | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Continue each prompt (token ids) by up to max_new_tokens tokens, a row stopping at the
    first of `stop_ids` it makes. `tp_mesh`: the mesh a tensor-parallel model is sharded over
    (every rank then takes rank 0's tokens). `keep_logits`: keep each step's logits."""
    device = model.rope_cache.device
    tokens, real = left_pad(prompts, pad_id, device)
    bs, prompt_len = tokens.shape
    check_length(prompt_len, max_new_tokens, model.args.max_seq_len)
    # Every row's keys sit in shared slots 0..total-1, the slot being the RoPE position: a
    # left-padded prompt starts at a later position, which attention does not see, as RoPE
    # scores depend only on the distance between two tokens.
    total = prompt_len + max_new_tokens
    key_real = torch.ones(bs, total, dtype=torch.bool, device=device)
    key_real[:, :prompt_len] = real
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out = torch.full((bs, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(bs, dtype=torch.bool, device=device)
    kept: list[torch.Tensor] = []
    with kv_caches(model, total):
        start = _clock(device)
        positions = torch.arange(prompt_len, device=device).expand(bs, prompt_len)
        logits = model(tokens, positions=positions, mask=prefill_mask(real))[:, -1]
        prefilled = _clock(device)
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float())
            next_token = sample(logits, sampling, generator)
            if tp_mesh is not None and tp_mesh.size() > 1:  # the same token on every rank
                dist.broadcast(next_token, group=tp_mesh.get_group(), group_src=0)
            out[:, step] = next_token.masked_fill(done, pad_id)
            done |= torch.isin(next_token, stops)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            slot = torch.full((bs, 1), prompt_len + step, device=device)
            mask = key_real[:, None, None, : prompt_len + step + 1]  # (bs, 1, 1, keys so far)
            logits = model(out[:, step : step + 1], positions=slot, mask=mask)[:, -1]
        finished = _clock(device)
    return _summary(out[:, : step + 1], real, stops, kept, prefilled - start, finished - prefilled)


def _summary(
    out: torch.Tensor,
    real: torch.Tensor,
    stops: torch.Tensor,
    logits: list[torch.Tensor],
    prefill_s: float,
    decode_s: float,
) -> Generation:
    lengths, stopped = [], []
    stop_set = set(stops.tolist())
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in stop_set]
        lengths.append(ends[0] + 1 if ends else len(row))
        stopped.append(bool(ends))
    return Generation(
        tokens=out.cpu(), lengths=lengths, stopped=stopped,
        prefill_tokens=int(real.sum()), prefill_s=prefill_s,
        decode_tokens=sum(lengths) - len(lengths), decode_s=decode_s, logits=logits,
    )  # fmt: skip
