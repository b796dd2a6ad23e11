"""Training checkpoints through torch.distributed.checkpoint (DCP): periodic saves, exact resume.

Layout: <dump_folder>/<checkpoint.folder>/step-<N>/. Each save is written to step-<N>.partial and
renamed when complete, so every step-<N> folder is a whole checkpoint and a crash mid-save leaves
the previous one as the newest. Model weights sit flat at the top level under titan's names (the
layout titan-convert-to-hf and titan-convert-from-hf read and write); the rest under optimizer,
lr_scheduler, dataloader and train_state.
"""

import dataclasses
import pickle
import re
import shutil
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titan.checkpoint.checksums import ChecksummedWriter, check_share
from titan.checkpoint.dcp_io import (
    CheckpointError,
    dcp_load,
    fit_to_model,
    load_dcp_model,
    read_dcp_metadata,
)
from titan.checkpoint.hf_save import HfExporter, hf_folder, save_hf
from titan.config.job_config import Checkpoint
from titan.converters.lora import adapter_keys, init_magnitudes
from titan.errors import ConfigError
from titan.hub import resolve_model_path
from titan.logger import logger

_STEP_DIR = re.compile(r"^step-(\d+)$")
_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, oldest first (partial saves are skipped)."""
    if not folder.is_dir():
        return []
    found = (_STEP_DIR.match(p.name) for p in folder.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def load_initial_weights(
    model: nn.Module, path: str, load_hf: Callable[..., None] | None = None
) -> None:
    """Start from other weights: a DCP folder (e.g. a seed checkpoint), or, given the model's
    loader of Hugging Face folders (`load_hf(model, path, skip=keys)` loads in place every
    tensor but `keys`, each rank reading only its own pieces), one of those. LoRA adapters load
    from a DCP folder that holds them (a LoRA run's checkpoint); base weights without them leave
    them at their init (DoRA's magnitudes become the loaded weights' row norms)."""
    adapters = adapter_keys(model)
    found: set[str] = set()  # adapters the folder holds
    if load_hf is not None:
        load_hf(model, path, skip=adapters)  # checked: every weight of the base model is there
    else:
        stored = read_dcp_metadata(Path(path)).state_dict_metadata
        found = adapters & stored.keys()
        if found and found != adapters:
            raise CheckpointError(
                f"{path} holds LoRA adapters for {len(found)} of this model's {len(adapters)} "
                "adapter tensors: set [lora] target_modules and use_dora as the run that saved it"
            )
        wanted = {k: v for k, v in model.state_dict().items() if k not in adapters - found}
        load_dcp_model(path, wanted, stored)  # the tensors share storage with the model's
    if adapters and not found:
        init_magnitudes([model])
    logger.info(f"checkpoint: initial weights loaded from {path}")


def build_checkpointer(
    ckpt: Checkpoint,
    dump_folder: str,
    world_size: int,
    load_hf: Callable[..., None],
    **parts: Any,
) -> tuple["CheckpointManager | None", int]:
    """(the run's manager or None, the step to start from): resume from the run's own newest
    (or checkpoint.load_step's) checkpoint, else load checkpoint.initial_load_path's weights (a
    Hugging Face folder or hub id through `load_hf` with initial_load_in_hf). `parts`: model,
    optimizer, lr_scheduler and dataloader, as CheckpointManager takes them."""
    if ckpt.create_seed_checkpoint and world_size > 1:
        raise ConfigError(
            "checkpoint.create_seed_checkpoint writes the full weights from one process: "
            "run it with NGPU=1 (any parallel degrees in the config are ignored)"
        )
    manager = None
    if ckpt.enable or ckpt.create_seed_checkpoint:
        manager = CheckpointManager(ckpt, dump_folder, **parts)
    if manager is not None and not ckpt.create_seed_checkpoint:
        # a named load_step must exist: load() lists the steps there are
        if complete_steps(manager.folder) or ckpt.load_step != -1:
            return manager, manager.load()
    if ckpt.initial_load_path:
        hf = load_hf if ckpt.initial_load_in_hf else None
        path = ckpt.initial_load_path  # a hub id only names transformers weights (titan.hub)
        if hf is not None:
            path = str(resolve_model_path(path, "weights", "checkpoint.initial_load_path"))
        load_initial_weights(parts["model"], path, hf)
    return manager, 0


class CheckpointManager:
    """Saves and restores the model, optimizer, LR schedule, data position, step and RNG."""

    def __init__(
        self,
        cfg: Checkpoint,
        dump_folder: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        dataloader: Any,
        guard: Any = None,
        hf_exporter: HfExporter | None = None,
    ):
        self._stager = None
        if cfg.async_mode == "async_with_pinned_mem":
            if not torch.cuda.is_available():
                raise ValueError(
                    "checkpoint.async_mode = 'async_with_pinned_mem' stages GPU tensors into "
                    "pinned host memory and needs CUDA; use 'async' on this machine"
                )
            # Pinned buffers are kept between saves, so only the first save pays to allocate them.
            options = StagingOptions(
                use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                use_non_blocking_copy=True,
            )  # fmt: skip
            self._stager = DefaultStager(options)
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.dataloader = dataloader
        self.guard = guard  # the anomaly tests' history (titan.trainer.anomaly), if any
        self.hf_exporter = hf_exporter  # the model's HF names and config.json (checkpoint.hf_save)
        # "global" for a loader read by global window index (any layout loads it); a streamed
        # source's position only means something for the same sharding: "dp{rank}_of_{degree}"
        self.dp_key = dataloader.state_key
        self._pending: tuple[Future, Path, Path] | None = None
        self._full_step = -1  # the step of the newest full save made or started
        # Rank 0 prepares and publishes folders; every rank writes its own shards. Saves use a
        # gloo group of their own so a background save never interleaves with training's
        # collectives on the default group.
        self._distributed = dist.is_initialized()
        self._coordinator = not self._distributed or dist.get_rank() == 0
        self._pg = dist.new_group(backend="gloo") if self._distributed else None

    def _state(self, step: int, skip: Collection[str] = ()) -> dict[str, Any]:
        """The state to save or to load into, without the parts in `skip`."""
        state: dict[str, Any] = {}
        if "model" not in skip:
            state.update(get_model_state_dict(self.model))
        if "optimizer" not in skip:
            # On an optimizer without state this takes a zero-gradient step to create it (Adam's
            # step count becomes 1), so it is only asked for when it will be saved or loaded.
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if "lr_scheduler" not in skip:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if "dataloader" not in skip:
            # Pickled: the loader's state is nested Python whose shape DCP cannot know before
            # loading.
            state["dataloader"] = {self.dp_key: pickle.dumps(self.dataloader.state_dict())}
        if "train_state" not in skip:
            state["train_state"] = {"step": step, "rng_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                state["train_state"]["rng_cuda"] = torch.cuda.get_rng_state()
            if self.guard is not None:
                state["train_state"]["anomaly"] = pickle.dumps(self.guard.state_dict())
        return state

    def maybe_save(self, step: int, last_step: bool) -> None:
        """Save at every `interval` steps and at the last step."""
        self._finish_pending(wait=False)
        if step % self.cfg.interval and not last_step:
            return
        if last_step and self.cfg.last_save_model_only:
            self.save_model_only(step)
        else:
            self._save(self._state(step), step, asynchronous=self.cfg.async_mode != "disabled")
            self._full_step = step
        if self.cfg.hf_save == "every" or (self.cfg.hf_save == "last" and last_step):
            state, dtype = get_model_state_dict(self.model), _EXPORT_DTYPES[self.cfg.export_dtype]
            save_hf(state, self.hf_exporter, hf_folder(self.folder, step), dtype, self._pg)

    def save_now(self, step: int) -> None:
        """A full, synchronous save of `step` (before a preemption exit): an async save in flight
        is finished first, and one of this step already made by the interval is not repeated."""
        self._finish_pending(wait=True)
        if self._full_step != step:
            self._save(self._state(step), step, asynchronous=False)
            self._full_step = step

    def save_model_only(self, step: int) -> None:
        """Weights only, in checkpoint.export_dtype (seed checkpoints and final exports)."""
        dtype = _EXPORT_DTYPES[self.cfg.export_dtype]
        state = {k: v.detach().to(dtype) for k, v in get_model_state_dict(self.model).items()}
        self._save(state, step, asynchronous=False)

    def _save(self, state: dict[str, Any], step: int, asynchronous: bool) -> None:
        self._finish_pending(wait=True)  # one save in flight at a time
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self._coordinator:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash
            partial.mkdir(parents=True)
        if self._distributed:
            dist.barrier(group=self._pg)  # no rank writes before the folder is fresh
        start = time.perf_counter()
        # with checksums, each rank hashes the files it wrote as part of the write itself (in the
        # background thread of an async save) and rank 0 adds checksums.json beside .metadata
        writer = ChecksummedWriter(partial) if self.cfg.checksums else dcp.FileSystemWriter(partial)
        if asynchronous:
            # async_save copies the state to CPU before returning; training goes on meanwhile
            future = dcp.async_save(
                state, checkpoint_id=str(partial), storage_writer=writer,
                async_stager=self._stager, process_group=self._pg,
            )  # fmt: skip
            self._pending = (future, partial, final)
            logger.info(f"checkpoint step {step}: staged in {time.perf_counter() - start:.2f}s")
            return
        dcp.save(state, checkpoint_id=str(partial), storage_writer=writer, process_group=self._pg)
        self._publish(partial, final)
        logger.info(
            f"checkpoint step {step}: saved to {final} in {time.perf_counter() - start:.2f}s"
        )

    def _finish_pending(self, wait: bool) -> None:
        if self._pending is None or not (wait or self._pending[0].done()):
            return
        future, partial, final = self._pending
        self._pending = None
        future.result()  # re-raises a failed save
        self._publish(partial, final)
        logger.info(f"checkpoint: async save to {final} complete")

    def _publish(self, partial: Path, final: Path) -> None:
        # rank 0's save returns after it wrote the metadata, which it does once every rank
        # reported its shards written: the folder is complete.
        if not self._coordinator:
            return
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # atomic: the folder is complete or absent
        if self.cfg.keep_latest_k > 0:
            for old in complete_steps(self.folder)[: -self.cfg.keep_latest_k]:
                shutil.rmtree(self.folder / f"step-{old}")

    def close(self) -> None:
        """Wait for an asynchronous save in flight and free the staging buffers."""
        self._finish_pending(wait=True)
        if self._stager is not None:
            self._stager.close()

    def load(self) -> int:
        """Restore the configured checkpoint; returns its step (0 when training starts fresh)."""
        steps = complete_steps(self.folder)
        if self.cfg.load_step != -1 and self.cfg.load_step not in steps:
            raise CheckpointError(
                f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint "
                f"step-{self.cfg.load_step} in {self.folder} (found: {steps or 'none'})"
            )
        if not steps:
            return 0
        # Every rank checks its share of the files; all agree on the step, then load it.
        step, metadata = self._pick_step(steps)
        path = self.folder / f"step-{step}"
        stored = metadata.state_dict_metadata
        if not any(k.startswith("train_state.") for k in stored):
            load_dcp_model(path, self.model, stored)  # a seed or model-only checkpoint
            logger.info(f"checkpoint: loaded model weights from {path}; training starts at step 0")
            return 0
        self._load_full(path, step, stored)
        logger.info(f"checkpoint: resumed from {path}")
        return step

    def load_newest(self) -> int:
        """Restore the newest whole checkpoint whatever load_step says (a rollback)."""
        self._finish_pending(wait=True)
        self.cfg = dataclasses.replace(self.cfg, load_step=-1)
        return self.load()

    def _pick_step(self, steps: list[int]) -> tuple[int, Metadata]:
        """The step to load and its metadata, the same on every rank. With load_step = -1,
        newer checkpoints with a missing, truncated or changed file are set aside as
        step-N.corrupt (kept, never loaded) once an older whole one is found; if none is whole,
        nothing is renamed and CheckpointError says why."""
        candidates = [self.cfg.load_step] if self.cfg.load_step != -1 else steps[::-1]
        problems: list[tuple[int, str]] = []
        for step in candidates:
            metadata, problem = self._check_step(self.folder / f"step-{step}")
            if problem is not None:
                problems.append((step, problem))
                continue
            for bad, why in problems if self._coordinator else ():
                path = self.folder / f"step-{bad}"
                path.rename(path.with_name(f"{path.name}.corrupt"))
                logger.error(
                    f"checkpoint step {bad} cannot be loaded: {why}. Renamed it to "
                    f"{path.name}.corrupt; resuming from step {step} instead"
                )
            return step, metadata
        why = "; ".join(f"step {step}: {e}" for step, e in problems)
        raise CheckpointError(
            f"no loadable checkpoint in {self.folder} ({why}); restore the named files, or move "
            "the broken step-N folders aside and set checkpoint.load_step to a whole one"
        )

    def _check_step(self, path: Path) -> tuple[Metadata | None, str | None]:
        """(metadata, None) when the folder's files are whole and match their checksums, else
        (None, the first problem). Each rank re-hashes its share of the files (checksums.share)
        so verification runs in parallel; the ranks then agree on the first problem found."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if self._distributed else (0, 1)
        metadata, problem, verified = None, None, None
        try:
            if self.cfg.checksums:
                metadata, verified = check_share(path, rank, world)
            else:
                metadata = read_dcp_metadata(path)
        except CheckpointError as e:
            problem = str(e)
        if self._distributed:
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, (problem, verified), group=self._pg)
            problem = next((p for p, _ in everyone if p is not None), None)
            verified = None if any(v is None for _, v in everyone) else [v for _, v in everyone]
        elif verified is not None:
            verified = [verified]
        if problem is None and self._coordinator and self.cfg.checksums:
            if verified is None:
                logger.info(
                    f"checkpoint: {path} has no checksums.json (saved by an older titan or with "
                    "checkpoint.checksums = false): its files are checked for size only"
                )
            else:
                size = sum(v.size for v in verified) / 2**30
                slowest = max(v.seconds for v in verified)
                logger.info(f"checkpoint: {path}: {size:.2f} GiB verified in {slowest:.2f}s")
        return (metadata, None) if problem is None else (None, problem)

    def _load_full(self, path: Path, step: int, stored: dict[str, Any]) -> None:
        # excluded parts are never asked for, so they stay exactly as a fresh start has them
        state = self._state(step, skip=self.cfg.exclude_from_loading)
        model_keys = [k for k in state if k not in _PARTS]  # the model's own keys sit flat
        if model_keys:
            fit_to_model(stored, {k: state[k] for k in model_keys}, path)
        if "dataloader" in state and not any(
            k.startswith(f"dataloader.{self.dp_key}") for k in stored
        ):
            logger.warning(
                f"checkpoint step {step}: no data position for {self.dp_key} (saved with "
                "another data-parallel degree, or from another kind of data source); this "
                "rank's data starts from the beginning"
            )
            state.pop("dataloader")
        if "train_state.anomaly" not in stored:  # saved by a titan without it
            state.get("train_state", {}).pop("anomaly", None)
        what = f"checkpoint step {step} at {path} cannot be loaded"
        dcp_load(state, path, what, process_group=self._pg)
        if model_keys:
            set_model_state_dict(self.model, {k: state[k] for k in model_keys})
        if "optimizer" in state:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "dataloader" in state:
            self.dataloader.load_state_dict(pickle.loads(state["dataloader"][self.dp_key]))
        if "train_state" in state:
            torch.set_rng_state(state["train_state"]["rng_cpu"])
            if "rng_cuda" in state["train_state"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["train_state"]["rng_cuda"])
            if "anomaly" in state["train_state"] and self.guard is not None:
                self.guard.load_state_dict(pickle.loads(state["train_state"]["anomaly"]))


_PARTS = ("optimizer", "lr_scheduler", "dataloader", "train_state")  # besides the model
