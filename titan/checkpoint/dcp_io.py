"""titan's DCP model folders, and the checks every checkpoint load goes through.

A model-only DCP folder holds `model.state_dict()` flat, under titan's names
(`layers.0.attention.wq.weight`); a training checkpoint (checkpoint/checkpointer.py) adds
optimizer, lr_scheduler, dataloader and train_state beside them, so either loads as a model.
"""

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from titan.errors import CheckpointError


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh folder next to out_dir that becomes out_dir only once the body succeeds,
    so an interrupted write never leaves a complete-looking but partial folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty (--overwrite or overwrite=True replaces it)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():  # move the old one aside first: rename cannot replace a full folder
            old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _single_process() -> Iterator[None]:
    # no_dist=True already says so; DCP still warns that no process group is initialized
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp_model(
    state_dict_titan: dict[str, torch.Tensor], dcp_dir: str | Path, overwrite: bool = False
) -> None:
    """Save model weights as a DCP checkpoint, flat under titan's names, from one process.
    Tied weights keep both keys, as `model.state_dict()` has them, so the folder loads
    with `dcp.load(model.state_dict())` as well as with `load_dcp_model`."""
    with atomic_dir(Path(dcp_dir), overwrite) as tmp:
        sd = {k: v.detach() for k, v in state_dict_titan.items()}
        with _single_process():
            dcp.save(sd, checkpoint_id=tmp, no_dist=True)


def read_dcp_metadata(dcp_dir: str | Path) -> Metadata:
    """A DCP folder's metadata, after checking that every data file it names is whole: present
    and at least as long as the metadata says. Raises CheckpointError naming the bad file."""
    dcp_dir = Path(dcp_dir)
    if not dcp_dir.is_dir():
        raise FileNotFoundError(f"DCP checkpoint folder not found: {dcp_dir}")
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(
            f"{dcp_dir} is not a DCP checkpoint: it has no .metadata file (a DCP save writes it "
            "last, so an interrupted save lacks it)"
        )
    try:
        metadata = dcp.FileSystemReader(dcp_dir).read_metadata()
    except Exception as e:
        raise CheckpointError(f"cannot read {dcp_dir / '.metadata'}: {e}") from e
    needed: dict[str, int] = {}  # file -> the end of the last byte range read from it
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = dcp_dir / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (named in {dcp_dir / '.metadata'})")
        if (have := file.stat().st_size) < size:
            raise CheckpointError(f"{file} is truncated: {have} bytes, the metadata needs {size}")
    return metadata


def fit_to_model(
    stored: dict[str, Any], state_dict: dict[str, torch.Tensor], dcp_dir: Path
) -> dict[str, torch.Tensor]:
    """The tensors of a model `state_dict` to read from a DCP folder whose metadata is `stored`.
    Raises CheckpointError when a weight is missing or has another (global) shape."""

    def storage(name: str) -> int:  # a DTensor's own data_ptr() is 0
        t = state_dict[name]
        return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()

    tied = "output.weight" in state_dict and "tok_embeddings.weight" in state_dict
    tied = tied and storage("output.weight") == storage("tok_embeddings.weight")
    request, missing, shapes = {}, [], []
    for name, t in state_dict.items():
        meta = stored.get(name)
        if meta is None:
            if not (tied and name == "output.weight"):  # a tied model fills it from the embedding
                missing.append(name)
        elif not isinstance(meta, TensorStorageMetadata) or meta.size != t.shape:
            shapes.append(f"{name}: {tuple(getattr(meta, 'size', ()))} vs model {tuple(t.shape)}")
        else:
            request[name] = t
    if missing or shapes:
        found = (("missing", missing), ("wrong shapes", shapes))
        parts = [f"{what} {xs[:5]}{' ...' if len(xs) > 5 else ''}" for what, xs in found if xs]
        raise CheckpointError(
            f"DCP checkpoint {dcp_dir} does not fit the model (another model.flavor or "
            f"vocab_size?): {', '.join(parts)}"
        )
    return request


def load_dcp_model(
    dcp_dir: str | Path,
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    stored: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Load model weights in place from a DCP folder: a model-only one, or a training checkpoint
    whose other keys (optimizer, step, ...) are ignored. Returns the loaded state dict.
    `stored`: the folder's checked `state_dict_metadata`, when the caller has read it already."""
    dcp_dir = Path(dcp_dir)
    if stored is None:
        stored = read_dcp_metadata(dcp_dir).state_dict_metadata
    if isinstance(model_or_state_dict, nn.Module):
        # state_dict() tensors share storage with the parameters: loading them loads the model
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    request = fit_to_model(stored, state_dict, dcp_dir)
    with _single_process():
        dcp_load(request, dcp_dir, f"cannot read DCP checkpoint {dcp_dir}", no_dist=True)
    return state_dict


def dcp_load(state: dict[str, Any], dcp_dir: str | Path, what: str, **kwargs: Any) -> None:
    """`dcp.load` in place; a failure becomes a one-line CheckpointError: `what`, the first
    rank's cause, and what to do."""
    try:
        dcp.load(state, checkpoint_id=str(dcp_dir), **kwargs)
    except CheckpointException as e:  # a BaseException whose str() is a full traceback
        cause = next(iter(e.failures.values()))[0]
        raise CheckpointError(
            f"{what} ({type(cause).__name__}: {cause}); a file may be corrupt: restore it, or "
            "load an older checkpoint (checkpoint.load_step)"
        ) from None
