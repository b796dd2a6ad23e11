"""The training entry point: build each component from its config section, then run train steps.

Run: CONFIG_FILE=train_configs/debug_model.toml ./run_train.sh [--section.key value ...]
  or python -m titan.train --job.config_file train_configs/debug_model.toml [--help]
"""

import dataclasses
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch

from titan.components.checkpoint import CheckpointManager, complete_steps, load_initial_weights
from titan.components.dataloader import DataError, build_dataloader
from titan.components.loss import IGNORE_INDEX, build_loss_fn
from titan.components.metrics import MetricsLogger, flops_per_token, peak_flops
from titan.components.optimizer import build_lr_scheduler, build_optimizer
from titan.components.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from titan.components.tokenizer import build_tokenizer
from titan.config import ConfigError, JobConfig, load_config
from titan.config.job_config import Model, Training
from titan.config.manager import help_text, to_dict, to_toml
from titan.logger import init_logger, logger
from titan.models.llama3 import FLAVORS, ModelArgs, Transformer
from titan.models.llama3.hf_io import CheckpointError
from titan.models.llama3.parallelize import parallelize_llama
from titan.parallelisms.parallel_dims import ParallelDims, resolve_parallel_dims


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/inf; the step was not applied."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "training.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'"
        )
    if name == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def model_args_for(cfg: Model, seq_len: int, tokenizer_words: int) -> ModelArgs:
    """The flavor's args, with the vocabulary override and a RoPE table sized to seq_len."""
    if cfg.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor = {cfg.flavor!r} is not one of {', '.join(FLAVORS)}")
    args = FLAVORS[cfg.flavor]
    vocab = args.vocab_size if cfg.vocab_size == -1 else cfg.vocab_size
    if tokenizer_words > vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_words} tokens but the model's vocabulary is "
            f"{vocab} rows: "
            "use the flavor's tokenizer or set model.vocab_size"
        )
    return dataclasses.replace(args, vocab_size=vocab, max_seq_len=seq_len)


def grad_accumulation_steps(cfg: Training, dp_degree: int) -> int:
    per_pass = cfg.local_batch_size * dp_degree
    global_batch = per_pass if cfg.global_batch_size == -1 else cfg.global_batch_size
    if global_batch % per_pass:
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not divisible by local_batch_size "
            f"{cfg.local_batch_size} x data-parallel degree {dp_degree} = {per_pass}"
        )
    return global_batch // per_pass


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        t = cfg.training
        self.device = pick_device(t.device)
        self.parallel_dims = self._check_supported()
        set_determinism(t.seed, t.deterministic)
        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        self.model_args = model_args_for(cfg.model, t.seq_len, self.tokenizer.n_words)
        self.model = self._build_model()
        self.n_params = sum(p.numel() for p in self.model.parameters())  # tied weights count once
        logger.info(f"model {cfg.model.name} {cfg.model.flavor}: {self.n_params:,} parameters")
        self.loss_fn = build_loss_fn(cfg.compile)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.grad_accum_steps = grad_accumulation_steps(t, self.parallel_dims.dp)
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, seq_len=t.seq_len, local_batch_size=t.local_batch_size,
            dp_rank=0, dp_degree=self.parallel_dims.dp, seed=t.seed,
        )  # fmt: skip
        self.compute_dtype = torch.float32
        if self.device.type == "cuda" and t.mixed_precision_param == "bfloat16":
            self.compute_dtype = torch.bfloat16
        self.metrics = self._build_metrics()
        self.step = 0
        self.checkpointer = self._build_checkpointer()

    def _build_checkpointer(self) -> CheckpointManager | None:
        """Resume from the run's own checkpoint, else start from checkpoint.initial_load_path."""
        ckpt = self.cfg.checkpoint
        manager = None
        if ckpt.enable or ckpt.create_seed_checkpoint:
            manager = CheckpointManager(
                ckpt, self.cfg.job.dump_folder, model=self.model, optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler, dataloader=self.dataloader,
            )  # fmt: skip
        if manager is not None and not ckpt.create_seed_checkpoint:
            if complete_steps(manager.folder):
                self.step = manager.load()
                return manager
        if ckpt.initial_load_path:
            load_initial_weights(
                self.model, self.model_args, ckpt.initial_load_path, ckpt.initial_load_in_hf
            )
        return manager

    def _check_supported(self) -> ParallelDims:
        """The parallel layout for this world size; stop early on what this build cannot do."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        try:
            dims = resolve_parallel_dims(self.cfg.parallelism, world_size)
        except ValueError as e:
            raise ConfigError(f"[parallelism] {e}") from None
        if world_size > 1:
            raise ConfigError(
                f"{world_size} processes were started, but this build of titan trains in one "
                "process only: multi-process parallelism (FSDP, TP, PP, CP) is not implemented "
                "yet; use NGPU=1"
            )
        return dims

    def _build_model(self) -> Transformer:
        # (1) the model on the meta device: no memory, no init cost
        with torch.device("meta"):
            model = Transformer(self.model_args)
        # (2) converters (float8/MX/LoRA): none configured
        # (3) parallelize: activation checkpointing, compile (and later TP/FSDP), in one fixed order
        parallelize_llama(model, self.parallel_dims, self.cfg)
        # (4) allocate on the device
        model.to_empty(device=self.device)
        # (5) initialize the weights (seeded, so every run with this seed starts identically)
        with torch.no_grad():
            model.init_weights(buffer_device=self.device)
        model.train()
        return model

    def _build_metrics(self) -> MetricsLogger:
        a = self.model_args
        embedding = 0 if a.tie_word_embeddings else a.vocab_size * a.dim
        fpt = flops_per_token(
            self.n_params, embedding, a.n_layers, a.n_heads, a.head_dim, a.max_seq_len
        )
        self.flops_per_token = fpt
        peak = None
        if self.device.type == "cuda":
            peak = peak_flops(
                torch.cuda.get_device_name(self.device), str(self.compute_dtype).split(".")[-1]
            )
        return MetricsLogger(
            self.cfg.metrics, self.cfg.job.dump_folder, rank=0, device=self.device,
            flops_per_token=fpt, peak_flops=peak, config_dict=to_dict(self.cfg),
        )  # fmt: skip

    def forward_backward(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Accumulate the step's gradients; returns the mean loss per target token."""
        # Divide each micro-batch's summed loss by the step's count of target tokens, so that
        # accumulation (and data parallel) gives the gradient of one big batch.
        n_targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
        loss_total = torch.zeros((), device=self.device)
        use_autocast = self.compute_dtype != torch.float32
        for inputs, labels in microbatches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, self.compute_dtype, enabled=use_autocast):
                logits = self.model(inputs)
            loss = self.loss_fn(logits, labels) / n_targets
            del logits  # the largest activation: free it before backward
            loss.backward()
            loss_total += loss.detach()
        return loss_total

    def train_step(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (mean token loss, grad norm)."""
        loss = self.forward_backward(microbatches)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        loss_value, norm_value = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {self.step}: loss {loss_value}, grad norm {norm_value}; the update was not "
                "applied. Lower optimizer.lr, raise lr_scheduler.warmup_steps, or check the data"
            )
        if self.cfg.training.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                grads, self.cfg.training.max_norm, grad_norm, foreach=True
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _next_microbatches(self, data_iter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        try:
            return [next(data_iter) for _ in range(self.grad_accum_steps)]
        except StopIteration:
            raise DataError(
                f"the data ran out at step {self.step}: set data.infinite = true or lower "
                "training.steps"
            ) from None

    def train(self) -> list[float]:
        """Run training.steps steps; returns the loss of every step."""
        t, job = self.cfg.training, self.cfg.job
        logger.info(
            f"training {t.steps} steps: {self.grad_accum_steps} micro-batch(es) of "
            f"{t.local_batch_size} x "
            f"{t.seq_len} tokens per step on {self.device}, compute {self.compute_dtype}"
        )
        gc.disable()  # collections mid-step stall every rank; collect on a fixed schedule instead
        losses, ntokens, data_s, last = [], 0, 0.0, time.perf_counter()
        data_iter = iter(self.dataloader)
        with (
            maybe_enable_profiling(
                self.cfg.profiling, job.dump_folder, rank=0, global_step=self.step
            ) as prof,
            maybe_enable_memory_snapshot(
                self.cfg.profiling, job.dump_folder, rank=0, global_step=self.step
            ) as snap,
        ):
            while self.step < t.steps:
                self.step += 1
                if self.step % t.gc_freq == 0:
                    gc.collect(1)
                data_start = time.perf_counter()
                microbatches = self._next_microbatches(data_iter)
                data_s += time.perf_counter() - data_start
                lr = self.lr_scheduler.get_last_lr()[0]
                loss, grad_norm = self.train_step(microbatches)
                losses.append(loss)
                ntokens += sum(inputs.numel() for inputs, _ in microbatches)
                if self.metrics.should_log(self.step, t.steps):
                    now = time.perf_counter()
                    self.metrics.log(
                        self.step, loss=loss, grad_norm=grad_norm, lr=lr, ntokens=ntokens,
                        elapsed_s=now - last, data_s=data_s,
                    )  # fmt: skip
                    ntokens, data_s, last = 0, 0.0, now
                if self.checkpointer is not None:
                    self.checkpointer.maybe_save(self.step, last_step=self.step == t.steps)
                for tracker in (prof, snap):
                    if tracker is not None:
                        tracker.step()
        gc.enable()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.metrics.close()
        logger.info(f"training done: {self.step} steps, final loss {losses[-1]:.6f}")
        return losses


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + help_text())
        return 0
    init_logger()
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        logger.error(f"bad config: {e}")
        return 2
    dump = Path(cfg.job.dump_folder)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "config.toml").write_text(to_toml(cfg))
    if cfg.job.print_config:
        logger.info("effective config:\n" + to_toml(cfg))
    try:
        trainer = Trainer(cfg)
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save_model_only(step=0)
            return 0
        trainer.train()
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, NonFiniteLossError) as e:
        logger.error(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
