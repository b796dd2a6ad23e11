"""Validation: a model's mean token loss and perplexity on held-out data, forward only.

The validation windows are read in order, once, by global index: batch b is windows
[b x B, (b + 1) x B), B = local_batch_size x dp degree, each dp rank taking its rows as in
training. So the loss is the same under any layout, and every validation reads the same data.
"""

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan.config.job_config import Data, Training, Validation
from titan.data.chat import ChatWindows
from titan.data.dataloader import all_documents, build_chat_windows
from titan.data.tokenizer import Tokenizer
from titan.data.tokens import (
    DataError,
    GlobalBatchLoader,
    PackedWindows,
    SyntheticWindows,
)
from titan.logger import logger
from titan.parallelisms.distributed import dist_sum
from titan.trainer.loss import IGNORE_INDEX

# (inputs, labels) of one micro-batch -> this rank's summed token loss
ForwardLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validation_windows(
    v: Validation, data: Data, tokenizer: Tokenizer, seq_len: int, seed: int, vocab_size: int
) -> tuple[PackedWindows | SyntheticWindows | ChatWindows, int | None]:
    """(the validation windows, how many there are: None for synthetic tokens, which never end)."""
    if v.path is None and v.dataset == "synthetic":
        # another seed than training's synthetic tokens: data the model has not seen
        return SyntheticWindows(tokenizer.n_words, seq_len, seed + 1), None
    holdout = v.path is None and v.dataset == "holdout"
    if data.format == "chat" and (v.path is not None or v.dataset != "default"):
        # chat training validates on chat examples: its held-out ones, or other chat data
        source = data if holdout else dataclasses.replace(
            data, dataset=v.dataset, path=v.path, split=v.split, holdout_every=0, streaming=False
        )  # fmt: skip
        part = "holdout" if holdout else "all"
        windows = build_chat_windows(source, tokenizer, seq_len, seed, part, vocab_size)
        return windows, windows.windows_in_epoch(0)
    if holdout:
        docs = all_documents(data, tokenizer, vocab_size).split(data.holdout_every)[1]
    else:
        source = dataclasses.replace(
            data, dataset=v.dataset, path=v.path, split=v.split, holdout_every=0, blend=[],
            blend_schedule=[], streaming=False,
        )  # fmt: skip
        docs = all_documents(source, tokenizer, vocab_size)  # a hub dataset: downloaded
    windows = PackedWindows(docs, seq_len, seed, shuffle=False, infinite=False)
    return windows, windows.epoch_tokens // (seq_len + 1)


class Validator:
    """Runs `steps` batches of validation windows through a forward-only loss."""

    def __init__(
        self,
        v: Validation,
        windows: PackedWindows | SyntheticWindows,
        n_windows: int | None,
        local_batch_size: int,
        dp_rank: int,
        dp_degree: int,
    ):
        self.freq, self.windows, self.local_batch_size = v.freq, windows, local_batch_size
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        global_batch = local_batch_size * dp_degree
        complete = None if n_windows is None else n_windows // global_batch
        if v.steps == -1 and complete is None:
            raise DataError("synthetic validation tokens never end: set validation.steps")
        self.steps = complete if v.steps == -1 else v.steps
        if complete is not None and not 1 <= self.steps <= complete:
            raise DataError(
                f"the validation data holds {n_windows:,} windows of seq_len + 1 tokens, "
                f"{complete} batch(es) of {global_batch} (local_batch_size x data-parallel "
                f"degree), not validation.steps = {v.steps}: lower validation.steps or "
                "training.local_batch_size, or validate on more data"
            )
        self.name = getattr(getattr(windows, "docs", None), "name", "synthetic tokens")
        logger.info(f"validation: {self.steps} batch(es) of {global_batch} windows of {self.name}")

    def due(self, step: int, last_step: int) -> bool:
        """Whether training step `step` is followed by a validation."""
        return step % self.freq == 0 or step == last_step

    def run(
        self,
        forward_loss: ForwardLoss,
        model_parts: list[nn.Module],
        device: torch.device,
        loss_meshes: tuple[DeviceMesh | None, ...] = (),
        count_mesh: DeviceMesh | None = None,
        progress: bool = False,
    ) -> tuple[float, int]:
        """(mean token loss, number of targets) over the validation batches, the model parts
        in eval mode. forward_loss gives this rank's summed loss of a micro-batch, summed over
        `loss_meshes` (the ranks holding parts of it: pipeline stages, context-parallel and
        data-parallel ranks); the targets are counted per data-parallel rank and summed over
        `count_mesh`."""
        for part in model_parts:  # no dropout (LoRA's): a fixed loss, training's RNG untouched
            part.eval()
        try:
            total, count = self._sum_losses(forward_loss, device, progress)
        finally:
            for part in model_parts:
                part.train()
        for mesh in loss_meshes:
            total = dist_sum(total, mesh)
        count_t = torch.tensor(count, dtype=torch.float64, device=device)
        n = int(dist_sum(count_t, count_mesh).item())
        return (total.item() / n if n else math.nan), n

    def _sum_losses(
        self, forward_loss: ForwardLoss, device: torch.device, progress: bool
    ) -> tuple[torch.Tensor, int]:
        """(this rank's summed loss, its target count) over the validation batches."""
        loader = GlobalBatchLoader(self.windows, self.local_batch_size, self.dp_rank,
                                   self.dp_degree)  # fmt: skip
        # on the device: NCCL reduces device tensors only
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        bar = _progress_bar(self.steps) if progress else None
        with torch.no_grad():
            for _ in range(self.steps):
                inputs, labels = next(loader)
                count += int((labels != IGNORE_INDEX).sum())
                total += forward_loss(inputs, labels).detach().double()
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        return total, count


def build_validator(
    v: Validation, data: Data, training: Training, tokenizer: Tokenizer, vocab_size: int,
    dp_rank: int, dp_degree: int,
) -> Validator | None:  # fmt: skip
    """The run's validation ([validation] with training's seq_len, seed and local batch), or
    None when it is off."""
    if not v.enable:
        return None
    t = training
    windows, n = validation_windows(v, data, tokenizer, t.seq_len, t.seed, vocab_size)
    return Validator(v, windows, n, t.local_batch_size, dp_rank, dp_degree)


def _progress_bar(total: int):
    from tqdm import tqdm  # a dependency of datasets

    return tqdm(total=total, desc="validation", unit="batch", mininterval=1.0)
