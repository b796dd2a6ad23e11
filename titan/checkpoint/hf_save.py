"""Hugging Face saves from the training job: the model's weights written by every rank through
DCP's `HuggingFaceStorageWriter`, consolidated into transformers safetensors shards.

Layout: <dump_folder>/<checkpoint.folder>/step-<N>-hf/ (config.json, generation_config.json,
model-0000i-of-0000n.safetensors, model.safetensors.index.json, the tokenizer's files), written
to step-<N>-hf.partial and renamed when complete. The model's names and rows come from an
`HfExporter` the trainer passes in (the checkpoint package does not know the models).
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from titan.logger import logger

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB", as titan-convert-to-hf
_SHARDED = "sharded"  # the writer's folder of per-rank files, removed once consolidated


@dataclass(frozen=True)
class HfExporter:
    """The model's side of an HF save. to_hf(state_dict, dtype): titan's (sharded) state dict
    -> transformers names in `dtype`, each rank converting only its pieces;
    write_metadata(folder, dtype): config.json and the other small files."""

    to_hf: Callable[..., dict[str, torch.Tensor]]
    write_metadata: Callable[[Path, torch.dtype], None]


def hf_folder(folder: Path, step: int) -> Path:
    return folder / f"step-{step}-hf"


def _file_indices(
    hf_sd: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int, pg
) -> dict[str, int]:
    """Every tensor of the model (all pipeline stages) -> its 1-based shard file, the same on
    every rank: in model order, a new file once max_bytes would be passed."""
    sizes = {name: t.numel() for name, t in hf_sd.items()}
    if dist.is_initialized():
        everyone: list[dict[str, int]] = [{}] * dist.get_world_size(pg)
        dist.all_gather_object(everyone, sizes, group=pg)
        sizes = {k: v for ranks in everyone for k, v in ranks.items()}  # stages in rank order
    item = torch.empty((), dtype=dtype).element_size()
    index, used, out = 1, 0, {}
    for name, numel in sizes.items():
        if used and used + numel * item > max_bytes:
            index, used = index + 1, 0
        out[name] = index
        used += numel * item
    return out


def save_hf(
    state_dict: dict[str, torch.Tensor],
    exporter: HfExporter,
    final: Path,
    dtype: torch.dtype,
    pg=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the model state dict as a transformers folder at `final` (replaced if there): each
    rank writes its pieces under <final>.partial/sharded, rank 0 consolidates them into whole
    tensors, writes config.json and renames the folder into place."""
    start = time.perf_counter()
    coordinator = not dist.is_initialized() or dist.get_rank() == 0
    partial = final.with_name(f"{final.name}.partial")
    if coordinator:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash
        partial.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier(group=pg)  # no rank writes before the folder is fresh
    hf_sd = exporter.to_hf(state_dict, dtype=dtype)
    writer = HuggingFaceStorageWriter(
        str(partial),
        fqn_to_index_mapping=_file_indices(hf_sd, dtype, max_shard_bytes, pg),
        save_distributed=True,  # every rank writes its own pieces
        enable_consolidation=True,  # rank 0 then writes whole tensors, in the save's finish
    )
    # finish (the consolidation) runs on rank 0 before the save returns on any rank
    dcp.save(hf_sd, storage_writer=writer, process_group=pg)
    if coordinator:
        shutil.rmtree(partial / _SHARDED)
        exporter.write_metadata(partial, dtype)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # atomic: the folder is complete or absent
    if dist.is_initialized():
        dist.barrier(group=pg)  # the folder is in place when any rank returns
    logger.info(
        f"checkpoint: Hugging Face weights saved to {final} in {time.perf_counter() - start:.2f}s"
    )
