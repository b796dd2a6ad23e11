"""Llama 3 weights to Hugging Face names on every rank, without gathering the model: what the
checkpoint manager's HF saves (`titan.checkpoint.hf_save`) write through DCP's HF writer.

wq/wk rows are permuted within each head (`state_dict_adapter`). A rank whose piece of wq/wk
holds whole heads permutes it locally; where a shard boundary falls inside a head (wk's 8 KV
heads under FSDP 16, or FSDP x TP's strided shards) that one weight is gathered, permuted and
cut back to the same placements, so only one full wq/wk is held at a time.
"""

import dataclasses
import functools
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from titan.checkpoint.hf_save import HfExporter
from titan.models.llama3.args import FLAVORS, ModelArgs
from titan.models.llama3.hf_io import TOKENIZER_FILES, write_hf_metadata
from titan.models.llama3.state_dict_adapter import _meta_to_hf_rows, hf_name


def _rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """_meta_to_hf_rows on a tensor or on this rank's piece of a DTensor (a DTensor back)."""
    if not isinstance(w, DTensor):
        return _meta_to_hf_rows(w, n_heads)
    head_rows = w.shape[0] // n_heads
    local = w.to_local()
    _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    contiguous = all(type(p) in (Shard, Replicate) for p in w.placements)
    if contiguous and offset[0] % head_rows == 0 and local.shape[0] % head_rows == 0:
        # whole heads here: permute them in place (an empty piece has nothing to permute)
        rows = local.shape[0] // head_rows
        local = _meta_to_hf_rows(local, rows) if rows else local
        return DTensor.from_local(
            local, w.device_mesh, w.placements, shape=w.shape, stride=w.stride(), run_check=False
        )
    replicate = [Replicate()] * w.device_mesh.ndim
    full = _meta_to_hf_rows(w.redistribute(placements=replicate).to_local(), n_heads)
    whole = DTensor.from_local(full, w.device_mesh, replicate, run_check=False)
    # a local cut, no communication; a copy, not a view of `full` (test_hf_save checks it)
    return whole.redistribute(placements=w.placements)


def sharded_to_hf(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A (sharded) titan model state dict -> transformers names and rows in `dtype`, each rank
    converting its own pieces. The tied output is dropped: transformers re-ties it."""
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    out = {}
    for key, w in state_dict.items():
        if args.tie_word_embeddings and key == "output.weight":
            continue
        w = w.detach().to(dtype)
        n = next((h for suffix, h in heads.items() if key.endswith(suffix)), None)
        out[hf_name(key, args)] = w if n is None else _rows_to_hf(w, n)
    return out


def _tokenizer_dir(tokenizer_path: str | None) -> Path | None:
    """The local folder of the run's tokenizer, when it holds files a transformers folder
    takes; else None (a hub id is not fetched for a save)."""
    if not tokenizer_path:
        return None
    path = Path(tokenizer_path)
    folder = path if path.is_dir() else path.parent
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def hf_exporter(args: ModelArgs, flavor: str, tokenizer_path: str | None = None) -> HfExporter:
    """What CheckpointManager needs to write this model (the run's `args` of `flavor`) as a
    transformers folder. config.json's max_position_embeddings is the flavor's, as
    titan-convert-to-hf writes it, unless the run trained longer (args.max_seq_len is the run's
    training.seq_len, which only sizes the RoPE table)."""
    tok_dir = _tokenizer_dir(tokenizer_path)
    longest = max(args.max_seq_len, FLAVORS[flavor].max_seq_len)
    args = dataclasses.replace(args, max_seq_len=longest)
    return HfExporter(
        to_hf=functools.partial(sharded_to_hf, args=args),
        write_metadata=lambda folder, dtype: write_hf_metadata(folder, args, dtype, tok_dir),
    )
