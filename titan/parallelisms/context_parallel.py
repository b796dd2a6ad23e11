"""Context parallel: each of the cp ranks holds a part of every sequence, and attention gathers
keys and values from all of them.

Sequences are cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r (causal load
balancing: an early chunk attends to few keys, a late one to many, so each rank gets one of
each). Attention all-gathers k and v along the sequence (the backward reduce-scatters their
gradients) and masks by the tokens' global positions and documents, so any document lengths
work: the mask, not the chunking, keeps attention inside documents. This is the function torch's
"allgather" rotation computes; the keys of all ranks are held at once during attention.
"""

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

# torch 2.13 renamed the differentiable all-gather (the old name warns there, is all 2.11 has)
_all_gather_autograd = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


def check_cp(cp: int, tp: int, sequence_parallel: bool, seq_len: int) -> None:
    """Every rank must get two equal chunks, and each chunk's tokens split evenly over TP."""
    if cp == 1:
        return
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


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of `x` along `dim` (its two chunks, early one first)."""
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[i] for i in chunk_order(cp, rank)], dim=dim)


def gather_sequence(mesh: DeviceMesh):
    """A function that all-gathers a tensor along a dim over `mesh`, with gradients: the chunks
    come back in rank order, not sequence order (attention masks by position, so it need not
    reorder them)."""

    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        moved = x.movedim(dim, 0).contiguous()
        full = _all_gather_autograd(moved, gather_dim=0, group=mesh)
        return full.movedim(0, dim)

    return gather


def apply_cp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make the model's attention (and its mask) see every cp rank's keys and values."""
    gather = gather_sequence(mesh)
    model.context_gather = gather
    for block in model.layers.values():
        block.attention.context_gather = gather


def shard_batch(
    inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor], mesh: DeviceMesh
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This cp rank's part of a batch: its chunks of the inputs, the labels, the model's keyword
    inputs (document_ids) and the tokens' positions in the window (for RoPE and the mask)."""
    cp, rank = mesh.size(), mesh.get_local_rank()
    bs, seqlen = inputs.shape
    positions = torch.arange(seqlen, device=inputs.device).expand(bs, seqlen)
    kwargs = {**kwargs, "positions": positions}
    shard = {k: shard_sequence(v, cp, rank) for k, v in kwargs.items()}
    return shard_sequence(inputs, cp, rank), shard_sequence(labels, cp, rank), shard
