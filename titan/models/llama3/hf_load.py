"""Load a transformers safetensors folder into a built (possibly sharded) Llama 3, each rank
reading from the files only the bytes of its own pieces: its FSDP/HSDP shard, its TP shard, its
pipeline stages' tensors. No rank holds another rank's data or the full model.

Why safetensors' lazy `safe_open(...).get_slice(name)[rows, cols]` and not DCP's
`HuggingFaceStorageReader` (torch 2.11-2.15 have it): DCP copies rectangular blocks of a
stored tensor into the same block of the destination, and titan's wq/wk rows are a permutation
of transformers' within each head (`state_dict_adapter`). Where a shard boundary falls inside a
head (wk's 8 KV heads under FSDP 16) a rank's rows come from both halves of the head, which no
block read expresses; here each contiguous run of the rows needed is read and put in place.
"""

from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from titan.errors import CheckpointError
from titan.models.llama3.args import ModelArgs
from titan.models.llama3.hf_io import hf_tensor_files, titan_from_hf_checked
from titan.models.llama3.state_dict_adapter import hf_name, hf_rows


def check_hf_folder(hf_dir: str | Path, args: ModelArgs) -> dict[str, Path]:
    """Each tensor of the transformers folder `hf_dir` and its file, once its headers show every
    weight of the model `args` describes, of the right shape (the errors of a full load)."""
    files = hf_tensor_files(hf_dir)
    shapes = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if files[name] == file:
                    shapes[name] = torch.empty(f.get_slice(name).get_shape(), device="meta")
    titan_from_hf_checked(shapes, args, str(hf_dir))
    return files


@torch.no_grad()
def load_hf_weights(
    model: nn.Module, hf_dir: str | Path, args: ModelArgs, skip: Collection[str] = ()
) -> None:
    """Load the transformers folder `hf_dir` into `model` in place: every tensor of its state
    dict but those in `skip` (LoRA adapters, not in the folder), in the tensor's dtype and on its
    device; of a DTensor, this rank's piece only. The folder is checked from its headers first."""
    hf_dir = Path(hf_dir)
    files = check_hf_folder(hf_dir, args)
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        try:
            name = hf_name(key, args)
        except KeyError as e:  # a parameter the HF format has no place for
            raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
        local, offset = _local_piece(tensor)
        if local.numel():
            _read_piece(files[name], name, local, offset, hf_rows(key, tensor.shape[0], args))


def _local_piece(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's local tensor and where it starts in the global one. A DTensor's piece is the
    block DTensor itself computes (the one DCP saves it as), nested FSDP x TP shards included."""
    if not isinstance(tensor, DTensor):
        return tensor, (0,) * tensor.dim()
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    local = tensor.to_local()  # under no_grad: the local tensor itself, not a copy
    assert tuple(local.shape) == tuple(shape), (tuple(local.shape), shape)
    return local, tuple(offset)


def _read_piece(
    file: Path,
    name: str,
    local: torch.Tensor,
    offset: tuple[int, ...],
    rows_from: torch.Tensor | None,
) -> None:
    """Copy the block of stored tensor `name` at `offset` into `local` (cast to its dtype). With
    `rows_from` (the stored row of each titan row), the rows are gathered through it: each
    contiguous run of the stored rows needed is one read."""
    start, n = offset[0], local.shape[0]
    cols = (slice(offset[1], offset[1] + local.shape[1]),) if local.dim() == 2 else ()
    # Opened per tensor: safetensors maps the file, and the pages a read touches stay in the
    # process's RSS until the mapping closes.
    with safe_open(file, framework="pt") as f:
        stored = f.get_slice(name)
        if rows_from is None:
            local.copy_(stored[(slice(start, start + n), *cols)])
            return
        src = rows_from[start : start + n]
        order = torch.argsort(src)  # local rows, by the stored row they come from
        ordered = src[order]
        breaks = (torch.diff(ordered) != 1).nonzero().flatten() + 1
        for run in torch.tensor_split(order, breaks):
            first = int(src[run[0]])
            block = stored[(slice(first, first + len(run)), *cols)]
            local.index_copy_(0, run.to(local.device), block.to(local.device, local.dtype))
