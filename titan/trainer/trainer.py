"""The Trainer: builds each component from its config section, then runs train steps. A dry run
(titan.trainer.dry_run) drives the same Trainer through its public steps."""

import contextlib
import functools
import gc
import os
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.tensor.parallel import loss_parallel

from titan import faults
from titan.checkpoint.checkpointer import CheckpointManager, build_checkpointer
from titan.config.checks import converters_of
from titan.config.job_config import JobConfig
from titan.config.manager import to_dict
from titan.converters import build_float8_stats
from titan.converters.float8 import precompute_float8_scales
from titan.data.dataloader import build_dataloader, document_ids
from titan.data.tokenizer import build_tokenizer
from titan.errors import AnomalyError, DataError
from titan.logger import logger
from titan.models.llama3.build import build_model, check_layout, model_args_for
from titan.models.llama3.hf_export import hf_exporter
from titan.models.llama3.hf_load import load_hf_weights
from titan.models.llama3.pipeline import StageUnion
from titan.parallelisms.context_parallel import shard_batch
from titan.parallelisms.distributed import (
    clip_grad_norm_tensor_,
    clip_to_norm_,
    comm_mode,
    dist_sum,
    local_grad_sum_of_squares,
    local_tensor,
)
from titan.parallelisms.parallel_dims import init_parallel
from titan.trainer.anomaly import AnomalyGuard, rng_state, rollback, set_rng_state, skip_recorded
from titan.trainer.fault_tolerance import data_slot
from titan.trainer.loss import IGNORE_INDEX, build_loss_fn
from titan.trainer.metrics import MetricsLogger, model_flops
from titan.trainer.monitor import StepMonitor
from titan.trainer.optimizer import build_lr_scheduler, build_optimizer
from titan.trainer.pipelined import PipelineSteps
from titan.trainer.preemption import PreemptionCheck
from titan.trainer.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from titan.trainer.runtime import (
    compute_dtype,
    grad_accumulation_steps,
    pick_device,
    set_determinism,
)
from titan.trainer.validate import build_validator


class Trainer(PipelineSteps):
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        t = cfg.training
        self.device = pick_device(t.device)
        self.dry_run = comm_mode() == "fake_backend"
        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path, dry_run=self.dry_run)
        self.model_args = model_args_for(cfg.model, t.seq_len, self.tokenizer.n_words)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.parallel_dims = check_layout(cfg, self.model_args, self.device, world_size)
        self.meshes = init_parallel(self.parallel_dims, self.device)
        if self.dry_run:  # traced eagerly: compile's kernels are not built
            self.compile_as_written = cfg.compile
            from titan.trainer.dry_run import traceable

            self.cfg = cfg = traceable(cfg, self.parallel_dims.ddp_enabled)
        dims = self.parallel_dims
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_mesh = self.meshes["dp"] if self.meshes else None
        self.dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        self.pp_mesh = self.meshes["pp"] if dims.pp > 1 else None
        self.cp_mesh = self.meshes["cp"] if dims.cp > 1 else None
        set_determinism(t.seed, t.deterministic)
        # model_parts: what runs (the model, or this rank's pipeline stages); model: all of this
        # rank's parameters under the full model's names (for optimizer and checkpoints)
        built = build_model(self.model_args, dims, self.meshes, cfg, self.device, self.dry_run)
        self.model_parts, self.n_params = built.parts, built.n_params
        self.stage_ids, self.n_stages = built.stage_ids, built.n_stages
        self.model = self.model_parts[0] if dims.pp == 1 else StageUnion(self.model_parts)
        logger.info(f"model {cfg.model.name} {cfg.model.flavor}: {self.n_params:,} parameters, "
                    f"{built.n_trainable:,} trainable")  # fmt: skip
        self.loss_fn = build_loss_fn(cfg.compile, t.loss_chunk_tokens)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        # torchft replica groups read as the dp ranks of one HSDP run over all groups
        data_rank, data_degree = data_slot(cfg.fault_tolerance, self.dp_rank, dims.dp)
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, seq_len=t.seq_len, local_batch_size=t.local_batch_size,
            dp_rank=data_rank, dp_degree=data_degree, seed=t.seed, dry_run=self.dry_run,
            accumulation=grad_accumulation_steps(t, data_degree),  # [(first window, steps)]
            vocab_size=self.model_args.vocab_size,
        )  # fmt: skip
        self.validator = None if self.dry_run else build_validator(  # a dry run: no validation
            cfg.validation, cfg.data, t, self.tokenizer, self.model_args.vocab_size,
            self.dp_rank, dims.dp,
        )  # fmt: skip
        self.compute_dtype = compute_dtype(self.device, self.dry_run, t.mixed_precision_param)
        # FSDP casts parameters itself (bf16 gathers, fp32 reduce); other layouts use autocast.
        self.use_autocast = self.compute_dtype != torch.float32 and not dims.fsdp_enabled
        # FSDP and DDP average gradients over the data-parallel ranks; the loss is scaled by
        # their number so that the average is the sum over the global batch.
        # (FSDP averages over dp_shard x cp: context-parallel ranks hold parts of the tokens.)
        self.grad_average_over = dims.dp * dims.cp if dims.fsdp_enabled or dims.ddp_enabled else 1
        self.loss_parallel = dims.tp > 1 and not cfg.parallelism.disable_loss_parallel
        self.loss_scale = 1.0  # 1 / the step's global target count (x FSDP's averaging)
        self.n_targets = 1.0  # the step's global target count
        self.poison = None  # titan.faults' poison_window: the factor on this step's loss
        # the plain or the pipelined forward/backward (and forward-only loss), picked once
        self.forward_backward, self.forward_loss = self._forward_backward, self._forward_loss
        if dims.pp > 1:
            self._build_pipeline()
        self.float8 = converters_of(cfg).float8
        # per-layer float8 cast statistics every debug_log_freq steps, or None
        self.float8_stats = self.float8 and build_float8_stats(
            self.model_parts, self.float8, cfg.job, self.rank
        )
        self.step = 0
        self.guard, self.rollback_due = AnomalyGuard(cfg.resilience, self.rank, self.device), False
        self.monitor: StepMonitor | None = None  # train() runs one: the watchdog, stragglers
        self.checkpointer = self._build_checkpointer()
        # after the checkpoint: TensorBoard and W&B continue from the step it resumes
        self.metrics = self._build_metrics(built.float8_flops)
        if self.float8 is not None:  # FSDP's float8 weight scales for the first forward
            precompute_float8_scales(self.model_parts, self.float8)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches in the next step (training.batch_size_schedule raises it)."""
        return self.dataloader.accumulation

    def validate(self, progress: bool = False) -> tuple[float, int]:
        """(mean token loss, targets) of the validation data at the current weights; logged."""
        start = time.perf_counter()
        self.loss_scale = 1.0  # the pipeline's loss function: summed token losses
        meshes = (self.pp_mesh, self.meshes.get("dp_cp"))
        loss, n = self.validator.run(
            self.forward_loss, self.model_parts, self.device, meshes, self.dp_mesh, progress
        )
        self.metrics.log_validation(self.step, loss, n, time.perf_counter() - start)
        return loss, n

    def _build_checkpointer(self) -> CheckpointManager | None:
        """Resume from the run's own checkpoint, else start from checkpoint.initial_load_path."""
        ckpt = self.cfg.checkpoint
        if self.dry_run:
            if ckpt.enable or ckpt.initial_load_path or ckpt.create_seed_checkpoint:
                logger.warning("dry run: checkpoint loading and saving are off")
            return None
        load_hf = functools.partial(load_hf_weights, args=self.model_args)
        manager, self.step = build_checkpointer(
            ckpt, self.cfg.job.dump_folder, self.parallel_dims.world_size, load_hf,
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            dataloader=self.dataloader, guard=self.guard,
            hf_exporter=hf_exporter(self.model_args, self.cfg.model.flavor,
                                    self.cfg.model.tokenizer_path),
        )  # fmt: skip
        return manager

    def _build_metrics(self, float8_flops: int) -> MetricsLogger:
        a = self.model_args
        low = "nvfp4" if converters_of(self.cfg).nvfp4 is not None else "float8"
        self.flops_per_token, peak, label = model_flops(
            a, self.n_params, float8_flops, self.device, self.compute_dtype, low
        )
        return MetricsLogger(
            self.cfg.metrics, self.cfg.job.dump_folder, rank=self.rank, device=self.device,
            flops_per_token=self.flops_per_token, peak_flops=peak, config_dict=to_dict(self.cfg),
            peak_label=label, run_name=self.cfg.job.description, start_step=self.step,
        )  # fmt: skip

    def _set_loss_scale(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Divide each micro-batch's summed loss by the global count of target tokens (all
        micro-batches, all data-parallel ranks), so that accumulation, data parallel and
        pipelining give the gradient of one big batch."""
        with unset_fake_temporarily():  # real counts of real labels, in a dry run too
            local_targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
            self.n_targets = dist_sum(torch.tensor(float(local_targets)), self.dp_mesh).item()
        # a step without targets (finetuning data may hold only prompts): zero loss and gradients
        self.loss_scale = self.grad_average_over / max(self.n_targets, 1.0)
        if self.poison is not None:  # a test hook (titan.faults): this step's data is bad
            self.loss_scale *= self.poison

    def _step_loss(self, local_loss: torch.Tensor) -> torch.Tensor:
        """The step's mean token loss on every rank: each data-parallel rank (and, pipelined,
        only the last stage) holds a share of it."""
        local_loss = local_loss / self.grad_average_over
        return dist_sum(dist_sum(local_loss, self.pp_mesh), self.meshes.get("dp_cp"))

    def _forward_backward(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Accumulate the step's gradients; returns the global mean loss per target token."""
        self._set_loss_scale(microbatches)
        loss_total = torch.zeros((), device=self.device)
        for inputs, labels in microbatches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            inputs, labels, kwargs = self._model_inputs(inputs, labels)
            with torch.autocast(self.device.type, self.compute_dtype, enabled=self.use_autocast):
                logits = self.model(inputs, **kwargs)
            # loss parallel: cross-entropy over vocabulary shards, without gathering the logits
            with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
                loss = self.loss_fn(logits, labels, self.loss_scale)
                del logits  # the largest activation: free it before backward
                loss.backward()
            loss_total += local_tensor(loss.detach())
        return self._step_loss(loss_total)

    def _forward_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's summed token loss of one micro-batch, forward only (validation)."""
        inputs, labels, kwargs = self._model_inputs(inputs.to(self.device), labels.to(self.device))
        with torch.autocast(self.device.type, self.compute_dtype, enabled=self.use_autocast):
            logits = self.model(inputs, **kwargs)
        with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            return local_tensor(self.loss_fn(logits, labels))

    def _model_inputs(self, inputs: torch.Tensor, labels: torch.Tensor):
        """(inputs, labels, the model's keyword inputs) of this rank: with block_causal masking
        each token's document, under context parallel this cp rank's chunks and positions."""
        with unset_fake_temporarily():  # real token ids in a dry run too: chunks read them
            kwargs = {}
            if self.model_args.attn_mask_type == "block_causal":
                kwargs["document_ids"] = document_ids(inputs, self.tokenizer.bos_id)
            if self.cp_mesh is None:
                return inputs, labels, kwargs
            return shard_batch(inputs, labels, kwargs, self.cp_mesh)

    def train_step(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (mean token loss, grad norm)."""
        if self.float8_stats is not None:
            self.float8_stats.start_step(self.step)
        rng = rng_state()  # a replay of the step draws the same random numbers (LoRA dropout)
        loss = self.forward_backward(microbatches)
        faults.corrupt_grads(self.model.parameters(), self.step, self.rank)  # a test hook
        if faults.fault("raise", self.step, self.rank):
            raise RuntimeError(f"rank {self.rank} fails in step {self.step} ({faults.ENV} raise)")
        if self.float8_stats is not None:  # before the update: a non-finite step's too
            self.float8_stats.end_step(self.step)
        if (sleep := faults.fault("sleep", self.step, self.rank)) is not None:
            time.sleep(sleep.value)  # a hang or a straggler made on purpose (tests)
        if self.monitor is not None:  # arrived: the clip's all-reduce waits for the others
            self.monitor.enter(self.step, "optimizer")
        return self.optimizer_step(loss, functools.partial(self._replay, microbatches, rng))

    def _replay(self, microbatches, rng) -> tuple[float, float]:
        """The step's forward/backward again, from the same weights, data and random state."""
        self.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
        loss = self.forward_backward(microbatches)
        return loss.item(), self._grad_norm().item()

    def _grad_norm(self) -> torch.Tensor:
        """The global norm over every parameter's shards and pipeline stages (not clipped)."""
        self.norm = clip_grad_norm_tensor_(list(self.model.parameters()), 0.0, self.pp_mesh)
        return self.norm

    def optimizer_step(self, loss: torch.Tensor, replay=None) -> tuple[float, float]:
        """Test the step ([resilience]: a non-finite or spiking loss or norm is replayed, then
        stops the run, skips the update or asks for a rollback), then clip and apply the
        gradients. `replay`: runs the step again (None: it cannot be)."""
        params = list(self.model.parameters())
        grad_norm = self._grad_norm().item()
        try:
            verdict = self.guard.check(
                self.step, loss.item(), grad_norm, replay,
                functools.partial(local_grad_sum_of_squares, params),
            )  # fmt: skip
        except AnomalyError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.rollback_due = verdict.action == "rollback"
        if verdict.action == "apply" and self.n_targets:
            clip_to_norm_(params, self.cfg.training.max_norm, self.norm)
            self.optimizer.step()
        elif verdict.action == "apply":  # Adam's moments and weight decay would move the weights
            logger.warning(f"step {self.step}: no target tokens in the global batch; not applied")
        if verdict.action != "rollback":  # a skipped step's schedule moves on with its data
            self.lr_scheduler.step()
        if self.float8 is not None and verdict.action == "apply":  # FSDP's float8 all-gather
            precompute_float8_scales(self.model_parts, self.float8)  # every weight's scale at once
        self.optimizer.zero_grad(set_to_none=True)
        return verdict.loss, verdict.grad_norm

    def _rollback(self):
        """Reload the newest checkpoint, skip the batches after it; returns the data iterator."""
        self.rollback_due = False
        n = self.cfg.resilience.rollback_skip_batches
        self.step = rollback(self.checkpointer, self.guard, self.step, n)
        data_iter = iter(self.dataloader)
        skip_recorded(self.checkpointer, self.dataloader, data_iter, self.step)
        return data_iter

    def _checkpoint(self, data_iter, preemption: PreemptionCheck) -> None:
        """After a step: the interval checkpoint; on a preemption signal, the step saved (and
        Preempted raised); then a rollback's recorded skip, which a resume from a checkpoint of
        this step (its data position before the skip) applies again."""
        last_step = self.step == self.cfg.training.steps
        if self.checkpointer is not None:
            self.monitor.enter(self.step, "checkpoint")
            self.checkpointer.maybe_save(self.step, last_step=last_step)
        if not last_step and preemption.agreed():
            preemption.stop(self.step, self.checkpointer)
        if self.checkpointer is not None:
            skip_recorded(self.checkpointer, self.dataloader, data_iter, self.step)

    def next_microbatches(self, data_iter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches (inputs, labels) from the dataloader's iterator."""
        first = getattr(self.dataloader, "consumed", None)  # indexed data: the first window
        try:
            microbatches = [next(data_iter) for _ in range(self.grad_accum_steps)]
            self.poison = faults.poison(first, getattr(self.dataloader, "consumed", None))
            return microbatches
        except StopIteration:
            raise DataError(
                f"the data ran out at step {self.step}: set data.infinite = true or lower "
                "training.steps"
            ) from None

    def step_metrics(self) -> dict[str, float]:
        """Further metrics of the step just taken, logged with it (none here)."""
        return {}

    def train(self) -> list[float]:
        """Run training.steps steps; returns the loss of every step."""
        t, job = self.cfg.training, self.cfg.job
        logger.info(
            (f"run {job.description!r}: " if job.description else "")
            + f"training {t.steps} steps: {self.grad_accum_steps} micro-"
            f"batch(es) of {t.local_batch_size} x {t.seq_len} tokens per step on {self.device}, "
            f"compute {self.compute_dtype}, {self.model_args.attn_mask_type} attention"
        )
        gc.disable()  # collections mid-step stall every rank; collect on a fixed schedule instead
        losses, ntokens, data_s, last = [], 0, 0.0, time.perf_counter()
        data_iter, first = iter(self.dataloader), self.step
        if self.checkpointer is not None:  # a rollback recorded at the step training starts from
            skip_recorded(self.checkpointer, self.dataloader, data_iter, self.step)
        monitor = StepMonitor(
            self.cfg.resilience, job.dump_folder, self.rank, self.device, self.step + 1,
            enabled=not self.dry_run,
        )  # fmt: skip
        with (
            maybe_enable_profiling(
                self.cfg.profiling, job.dump_folder, rank=self.rank, global_step=self.step
            ) as prof,
            maybe_enable_memory_snapshot(
                self.cfg.profiling, job.dump_folder, rank=self.rank, global_step=self.step
            ) as snap,
            monitor as self.monitor,  # closed on an exception too: no watchdog left behind
            # from here a preemption signal only sets a flag, checked after each step
            PreemptionCheck(self.cfg.resilience.preemption_signals) as preemption,
        ):
            while self.step < t.steps:
                self.step += 1
                self.monitor.enter(self.step, "data")
                if self.step % t.gc_freq == 0:
                    gc.collect(1)
                data_start = time.perf_counter()
                microbatches = self.next_microbatches(data_iter)
                data_s += time.perf_counter() - data_start
                self.monitor.enter(self.step, "forward-backward")
                lr = self.lr_scheduler.get_last_lr()[0]
                loss, grad_norm = self.train_step(microbatches)
                if self.rollback_due:  # resilience.on_anomaly = 'rollback'
                    data_iter = self._rollback()
                    del losses[max(0, self.step - first) :]
                    continue
                losses.append(loss)
                # per device: ranks of one data-parallel rank (TP, CP, PP) share its tokens
                n = sum(x.numel() for x, _ in microbatches)
                ntokens += n / self.parallel_dims.non_data_parallel
                if self.metrics.should_log(self.step, t.steps):
                    now = time.perf_counter()
                    self.metrics.log(
                        self.step, loss=loss, grad_norm=grad_norm, lr=lr, ntokens=ntokens,
                        elapsed_s=now - last, data_s=data_s, extra=self.step_metrics(),
                    )  # fmt: skip
                    ntokens, data_s, last = 0, 0.0, now
                if self.validator is not None and self.validator.due(self.step, t.steps):
                    self.monitor.enter(self.step, "validation")
                    paused = time.perf_counter()
                    self.validate()
                    last += time.perf_counter() - paused  # not training: out of tokens/s
                self._checkpoint(data_iter, preemption)
                for tracker in (prof, snap):
                    if tracker is not None:
                        tracker.step()
                self.monitor.step_done(self.step)
        gc.enable()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.metrics.close()
        logger.info(f"training done: {self.step} steps, final loss {losses[-1]:.6f}")
        return losses
