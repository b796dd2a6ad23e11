"""The training loss: summed token cross-entropy, times the caller's scale (1 / the step's
global target count).

The plain loss upcasts the whole (tokens x vocabulary) logits to fp32 and keeps their fp32
log-probabilities for backward: 7.8 GiB for Llama 3's 128,256-token vocabulary at 16,384 tokens
a micro-batch, twice the bf16 logits themselves. The chunked loss walks the tokens a chunk at a
time, upcasts only that chunk and writes its gradient (softmax - one-hot, times the scale) into
one buffer of the logits' own dtype during the forward, so backward only hands that buffer on;
nothing of vocabulary size and fp32 outlives a chunk. Under loss parallel the logits are a
vocabulary shard per TP rank and each chunk's max, normalizer and target logit are summed over
the TP group, so the full-vocabulary logits are never gathered either.

torch's F.cross_entropy has no chunked form and torch.compile does not split the vocabulary
reduction over tokens by itself; Liger-style fused kernels are CUDA-only Triton and do not take
DTensor shards, hence this small Function (the math is the textbook softmax cross-entropy).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from titan.config.job_config import Compile
from titan.data.tokens import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0):
    """scale x the sum of per-token cross-entropy in fp32; logits (bs, seqlen, vocab), labels
    (bs, seqlen). The plain form: fp32 log-probabilities of every token kept for backward."""
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(0, 1),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )
    return loss * scale


class _ChunkedCrossEntropy(torch.autograd.Function):
    """scale x summed cross-entropy of `logits` (tokens, local vocabulary) against `labels`
    (tokens,), `chunk` tokens at a time; `group` and `offset`: the TP group over which the
    vocabulary is sharded and this rank's first vocabulary id (None, 0 when it is whole)."""

    @staticmethod
    def forward(ctx, logits, labels, scale, chunk, group, offset):
        n, vocab = logits.shape
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        total = torch.zeros((), device=logits.device, dtype=torch.float32)
        for start in range(0, n, chunk):
            x = logits[start : start + chunk].to(torch.float32, copy=True)  # worked in place
            y = labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            local = y - offset
            here = valid & (local >= 0) & (local < vocab)  # the target id is in this shard
            local = local.masked_fill(~here, 0).unsqueeze(1)
            top = x.amax(dim=1)
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            x.sub_(top.unsqueeze(1))
            target = x.gather(1, local).squeeze(1).masked_fill(~here, 0.0)
            x.exp_()
            sums = torch.stack([x.sum(dim=1), target])
            if group is not None:
                dist.all_reduce(sums, group=group)
            lse = sums[0].log()
            total += (lse - sums[1]).masked_fill(~valid, 0.0).sum()
            if grad is not None:  # d loss / d logits = scale * (softmax - onehot(target))
                x.div_(sums[0].unsqueeze(1))
                x.scatter_add_(1, local, -here.unsqueeze(1).to(x.dtype))
                x.mul_(valid.unsqueeze(1).to(x.dtype) * scale)
                grad[start : start + chunk] = x
        ctx.grad = grad
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "the chunked loss hands its gradient on once: a second backward through it "
                "(retain_graph) needs training.loss_chunk_tokens = 0"
            )
        return grad.mul_(grad_out), None, None, None, None, None


def chunked_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0, chunk: int = 1024
) -> torch.Tensor:
    """cross_entropy_sum, `chunk` tokens at a time: equal within fp32 rounding, without fp32
    log-probabilities of the whole micro-batch. `logits` may be a vocabulary-sharded DTensor
    (loss parallel); the result is then the same plain tensor on every TP rank."""
    labels = labels.flatten()
    if isinstance(logits, DTensor):
        if len(logits.placements) != 1 or logits.placements[0] != Shard(logits.ndim - 1):
            raise ValueError(f"loss parallel takes vocabulary-sharded logits, not {logits}")
        mesh = logits.device_mesh
        # Shard(-1) splits the vocabulary as torch.chunk does: ceil(vocab / tp) ids per rank
        offset = mesh.get_local_rank() * -(-logits.shape[-1] // mesh.size())
        local = logits.to_local()
        return _ChunkedCrossEntropy.apply(
            local.flatten(0, -2), labels, scale, chunk, mesh.get_group(), offset
        )
    return _ChunkedCrossEntropy.apply(logits.flatten(0, -2), labels, scale, chunk, None, 0)


def build_loss_fn(cfg: Compile, chunk_tokens: int = 1024) -> LossFn:
    """The loss: chunked by `chunk_tokens` (0: the plain one), compiled when compile.components
    includes "loss"."""
    if chunk_tokens == 0:
        fn = cross_entropy_sum
    else:

        def fn(logits, labels, scale=1.0):
            return chunked_cross_entropy_sum(logits, labels, scale, chunk_tokens)

    if cfg.enable and "loss" in cfg.components:
        return torch.compile(fn, backend=cfg.backend)
    return fn
