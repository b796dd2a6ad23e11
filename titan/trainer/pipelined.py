"""The pipelined forward/backward and forward loss: the Trainer's steps when pipeline parallel
splits the model into stages (a mixin of Trainer, which holds the state they use: the schedule,
the loss scale, this rank's stages)."""

import contextlib

import torch
from torch.distributed.tensor.parallel import loss_parallel

from titan.models.llama3.pipeline import static_stage_shapes
from titan.parallelisms.distributed import local_tensor
from titan.parallelisms.pipeline import build_schedule


class PipelineSteps:
    def _build_pipeline(self) -> None:
        """This rank's pipeline schedule, and the pipelined forward/backward and forward loss."""
        cfg, dims = self.cfg, self.parallel_dims
        shapes = None
        if self.dry_run:  # no neighbour stage to learn shapes from: give them
            shapes = static_stage_shapes(
                self.model_parts, cfg.parallelism, cfg.training.seq_len,
                self.meshes["tp"] if dims.tp > 1 else None, self.loss_parallel,
            )  # fmt: skip
        self.schedule = build_schedule(
            self.model_parts, self.stage_ids, self.n_stages, self.pp_mesh, self.device,
            cfg.parallelism, cfg.training.local_batch_size, self._pipeline_loss, shapes,
        )  # fmt: skip
        self.has_first_stage = 0 in self.stage_ids
        self.has_last_stage = self.n_stages - 1 in self.stage_ids
        self.forward_backward = self._forward_backward_pipelined
        self.forward_loss = self._forward_loss_pipelined

    def _stage_inputs(self, inputs: torch.Tensor, labels: torch.Tensor):
        """(the first stage's args, the last stage's target, keyword inputs) for the schedule.
        The token ids are made contiguous: they are views of (seq_len + 1)-token windows, and
        torch 2.11's stages check each micro-batch's strides against the first's shape
        inference, which gives contiguous ones."""
        inputs, labels, kwargs = self._model_inputs(inputs.to(self.device), labels)
        args = (inputs.contiguous(),) if self.has_first_stage else ()
        target = labels.to(self.device) if self.has_last_stage else None
        return args, target, kwargs

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels, self.loss_scale)

    def _forward_backward_pipelined(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """The same as _forward_backward, run by the pipeline schedule over this rank's stages:
        the first stage takes the inputs, the last the labels and the loss."""
        self._set_loss_scale(microbatches)
        loss_total = torch.zeros((), device=self.device)
        for inputs, labels in microbatches:
            args, target, kwargs = self._stage_inputs(inputs, labels)
            losses: list[torch.Tensor] = []  # the schedule clears it: one list per step()
            with (
                torch.autocast(self.device.type, self.compute_dtype, enabled=self.use_autocast),
                loss_parallel() if self.loss_parallel else contextlib.nullcontext(),
            ):
                self.schedule.step(*args, target=target, losses=losses, **kwargs)
            for loss in losses:  # the last stage's: one per pipeline micro-batch
                loss_total += local_tensor(loss.detach())
        return self._step_loss(loss_total)

    def _forward_loss_pipelined(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """_forward_loss through the schedule's forward-only pass (the last stage's loss)."""
        args, target, kwargs = self._stage_inputs(inputs, labels)
        losses: list[torch.Tensor] = []
        with (
            torch.autocast(self.device.type, self.compute_dtype, enabled=self.use_autocast),
            loss_parallel() if self.loss_parallel else contextlib.nullcontext(),
        ):
            self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        return sum((local_tensor(x) for x in losses), torch.zeros((), device=self.device))
