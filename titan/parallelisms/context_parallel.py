"""Context parallel: each of the cp ranks holds a part of every sequence, and attention sees the
keys and values of all of them.

Sequences are cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r (causal load
balancing: an early chunk attends to few keys, a late one to many, so each rank gets one of
each). Two attentions:
- causal: torch's ring attention (`torch.distributed.tensor.experimental._context_parallel`),
  its load-balanced loop, key/value rotation (`rotate_method` allgather or alltoall) and
  log-sum-exp merge, run on each device's SDPA kernel (flash on CUDA, the CPU flash kernel
  elsewhere, so CPU tests run torch's loop itself);
- block_causal: k and v are all-gathered along the sequence (the backward reduce-scatters their
  gradients) and attention masks by the tokens' global positions and documents, so documents of
  any length work: the mask, not the chunking, keeps attention inside documents (torch's ring
  only knows is_causal). The keys of all ranks are held at once during attention.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

from titan.compat import all_gather_autograd
from titan.logger import logger

aten = torch.ops.aten


def check_cp(
    cp: int, tp: int, sequence_parallel: bool, seq_len: int, mask_type: str = "causal",
    rotate_method: str = "allgather", cuda_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """Every rank must get two equal chunks, each chunk's tokens must split evenly over TP, and
    the mask, rotation and (on CUDA, cuda_dtype) compute dtype must have a CP attention."""
    if cp == 1:
        return
    if mask_type == "block_causal" and rotate_method != "allgather":
        raise ValueError(
            f"parallelism.context_parallel_rotate_method = {rotate_method!r} with "
            "model.attn_mask_type = 'block_causal': document masks all-gather the keys (torch's "
            "ring rotation only knows causal masks); use rotate_method 'allgather'"
        )
    if mask_type == "causal" and cuda_dtype not in (None, torch.bfloat16):
        raise ValueError(
            "context parallel with causal attention on CUDA runs torch's ring flash attention, "
            f"which has no {str(cuda_dtype).removeprefix('torch.')} kernel: use "
            "training.mixed_precision_param = 'bfloat16'"
        )
    parts = 2 * cp * (tp if tp > 1 and sequence_parallel else 1)
    if seq_len % parts:
        split = f" x tensor_parallel_degree {tp} (sequence parallel)" if parts != 2 * cp else ""
        raise ValueError(
            f"training.seq_len {seq_len} does not divide into 2 x context_parallel_degree {cp}"
            f"{split} = {parts} equal chunks: use a seq_len that is a multiple of {parts}"
        )


def chunk_order(cp: int, rank: int) -> list[int]:
    """The two of the 2 x cp sequence chunks that `rank` holds: one early, one late."""
    return [rank, 2 * cp - 1 - rank]


def take_chunks(x: torch.Tensor, n_chunks: int, chunks: list[int], dim: int = 1) -> torch.Tensor:
    """`chunks` of the n_chunks equal chunks of `x` along `dim`, concatenated in that order."""
    parts = x.chunk(n_chunks, dim=dim)
    return torch.cat([parts[i] for i in chunks], dim=dim)


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of `x` along `dim` (its two chunks, early one first)."""
    return take_chunks(x, 2 * cp, chunk_order(cp, rank), dim)


# Flex attention's block size: chunks at least this long (when seq_len allows) keep whole blocks
# of one rank's queries together, so the block-sparse kernel still skips masked blocks.
FLEX_BLOCK = 128


def document_chunks(documents: torch.Tensor, cp: int, block: int = FLEX_BLOCK) -> list[list[int]]:
    """Which of n equal sequence chunks each cp rank takes under block_causal, balancing the
    attention work of documents of any lengths. documents: (bs, seqlen), nondecreasing per row.

    The sequence is cut into 2 x cp x m chunks (m the largest of 8, 4, 2, 1 that leaves chunks of
    at least `block` tokens, else 1). A chunk's work is the number of (block x block) tiles of
    its queries against all keys that hold an allowed pair (a block-sparse kernel computes these
    and skips the rest; tiles shrink to the chunk when chunks are shorter). Each rank takes 2m
    chunks, the heaviest first to the lightest rank with room (longest-processing-time with
    equal counts); the head-tail pairs are kept when they are at least as even. Every cp rank
    computes the same answer from the same documents."""
    bs, seqlen = documents.shape
    m = next((m for m in (8, 4, 2) if seqlen % (2 * cp * m) == 0
              and seqlen // (2 * cp * m) >= block), 1)  # fmt: skip
    n = 2 * cp * m
    tiles = documents.view(bs, -1, min(block, seqlen // n))  # (bs, n_tiles, tile)
    first, last = tiles[..., 0].contiguous(), tiles[..., -1].contiguous()
    # documents run in order: query tile q meets key tiles lo..q, lo the first whose last
    # document reaches q's first; summed over the batch, as every row takes the same chunks
    lo = torch.searchsorted(last, first)
    per_tile = torch.arange(first.shape[1], device=documents.device) - lo + 1
    loads = per_tile.sum(0).view(n, -1).sum(1).tolist()
    head_tail = [[i * m + j for i in chunk_order(cp, r) for j in range(m)] for r in range(cp)]
    ranks, totals = [[] for _ in range(cp)], [0] * cp
    for c in sorted(range(n), key=lambda c: (-loads[c], c)):
        r = min((r for r in range(cp) if len(ranks[r]) < 2 * m), key=lambda r: (totals[r], r))
        ranks[r].append(c)
        totals[r] += loads[c]
    if max(sum(loads[c] for c in cs) for cs in head_tail) <= max(totals):
        return head_tail
    return [sorted(cs) for cs in ranks]


def gather_sequence(mesh: DeviceMesh):
    """A function that all-gathers a tensor along a dim over `mesh`, with gradients: the chunks
    come back in rank order, not sequence order (attention masks by position, so it need not
    reorder them)."""

    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        moved = x.movedim(dim, 0).contiguous()
        full = all_gather_autograd(moved, gather_dim=0, group=mesh)
        return full.movedim(0, dim)

    return gather


class _RingAttention(torch.autograd.Function):
    """torch's load-balanced causal ring attention over `group` (q, k, v: this rank's two
    chunks, (bs, heads, 2 x chunk, head_dim); GQA: k and v may have fewer heads), forward and
    backward, on the device's SDPA kernel."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        cuda = q.device.type == "cuda"
        op = aten._scaled_dot_product_flash_attention if cuda else _cpu_flash
        out, lse, *rest = torch_cp._templated_ring_attention(
            group, 2, op, q, k, v, is_causal=True, dropout_p=0.0, scale=None
        )
        ctx.save_for_backward(q, k, v, out, lse, *rest[:2], *rest[4:6])
        ctx.group, ctx.max_qk = group, rest[2:4]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        op, kwargs = _cpu_flash_backward, {}
        if q.device.type == "cuda":  # the flash kernel's bookkeeping from the forward
            cum_q, cum_k, seed, offset = rest
            max_q, max_k = ctx.max_qk
            op = _cuda_flash_backward
            kwargs = dict(cum_seq_q=cum_q, cum_seq_k=cum_k, max_q=max_q, max_k=max_k,
                          philox_seed=seed, philox_offset=offset)  # fmt: skip
        dq, dk, dv, *_ = torch_cp._templated_ring_attention_backward(
            ctx.group, 2, op, grad_out=grad_out.contiguous(), grad_out_name="grad_out",
            query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=True, dropout_p=0.0,
            scale=None, **kwargs,
        )  # fmt: skip
        return dq, dk, dv, None


# torch's loop calls its kernel with keyword arguments; these pass them on by position
# (dynamo, tracing a compiled block, takes an `out=` keyword for an out-variant's output).
def _cpu_flash(q, k, v, *, is_causal, dropout_p, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, scale=scale
    )


def _cpu_flash_backward(*, grad_out, query, key, value, out, logsumexp, is_causal, dropout_p,
                        scale):  # fmt: skip
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale=scale
    )


def _cuda_flash_backward(*, grad_out, query, key, value, out, logsumexp, is_causal, dropout_p,
                         scale, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed,
                         philox_offset):  # fmt: skip
    return aten._scaled_dot_product_flash_attention_backward(
        grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
        dropout_p, is_causal, philox_seed, philox_offset, scale=scale,
    )  # fmt: skip


def ring_attention(mesh: DeviceMesh, rotate_method: str):
    """Causal attention of this rank's q over every cp rank's k and v, by torch's ring."""
    # torch keeps these as module-wide options: titan's chunks are its head-tail layout
    torch_cp._cp_options.enable_load_balance = True
    torch_cp.set_rotate_method(rotate_method)
    group = mesh.get_group()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, group)

    return attend


def apply_cp(model: nn.Module, mesh: DeviceMesh, mask_type: str, rotate_method: str) -> None:
    """Make the model's attention see every cp rank's keys and values: torch's ring attention
    for a causal mask; for block_causal, gathered keys (and their positions and documents)."""
    if mask_type == "causal":
        logger.info(f"context parallel: torch's ring attention, {rotate_method} rotation")
        ring = ring_attention(mesh, rotate_method)
        for block in model.layers.values():
            block.attention.ring_attention = ring
        return
    logger.info("context parallel: keys all-gathered under the document mask, chunks by document")
    gather = gather_sequence(mesh)
    model.context_gather = gather
    for block in model.layers.values():
        block.attention.context_gather = gather


def shard_batch(
    inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor], mesh: DeviceMesh
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This cp rank's part of a batch: its chunks of the inputs, the labels, the model's keyword
    inputs (document_ids) and the tokens' positions in the window (for RoPE and the mask).
    Causal: head-tail chunks (torch's ring expects them); block_causal: chunks balanced by the
    documents' work (the mask goes by position and document, so any chunks give the same
    attention)."""
    cp, rank = mesh.size(), mesh.get_local_rank()
    bs, seqlen = inputs.shape
    n, chunks = 2 * cp, chunk_order(cp, rank)
    if "document_ids" in kwargs:
        per_rank = document_chunks(kwargs["document_ids"], cp)
        n, chunks = cp * len(per_rank[0]), per_rank[rank]
    positions = torch.arange(seqlen, device=inputs.device).expand(bs, seqlen)
    kwargs = {**kwargs, "positions": positions}
    shard = {k: take_chunks(v, n, chunks) for k, v in kwargs.items()}
    return take_chunks(inputs, n, chunks), take_chunks(labels, n, chunks), shard
