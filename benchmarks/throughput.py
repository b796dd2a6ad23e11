"""Training throughput of titan on one device, optionally against a plain Hugging Face loop.

Run from the repository root:
  python benchmarks/throughput.py --config titan/train_configs/debug_model.toml [--steps 20]
      [--warmup 3] [--chunk 5] [--vs-hf] [--section.key value ...]

Prints tokens/s per device, TFLOP/s, MFU and peak memory of titan's Trainer.train_step. With
--vs-hf it also trains transformers' LlamaForCausalLM with the loop a user would write, from the
same initial weights, on the same batches, with the same optimizer, LR schedule, clipping and
accumulation; the two run in alternating chunks in one process so machine noise hits both.
The last line is `ratio titan/hf: <x.xx>` (tokens/s). Data defaults to synthetic tokens unless
a --data.* override is given; training.steps is set to warmup + steps so the LR schedule spans
the run; checkpointing, profiling, TensorBoard and W&B are off.
"""

import argparse
import ctypes
import ctypes.util
import functools
import gc
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from titan.config import JobConfig, load_config  # noqa: E402
from titan.errors import ConfigError  # noqa: E402
from titan.models.llama3.state_dict_adapter import hf_config_dict, to_hf  # noqa: E402
from titan.trainer.loss import IGNORE_INDEX  # noqa: E402
from titan.trainer.optimizer import lr_factor  # noqa: E402
from titan.trainer.trainer import Trainer  # noqa: E402

Batch = list[tuple[torch.Tensor, torch.Tensor]]  # one optimizer step's micro-batches
StepFn = Callable[[Batch], float]  # trains one step, returns its mean token loss
_MIB = 1024**2


@dataclass
class Loop:
    """One training loop under test, what it holds between steps, and what it measured."""

    name: str
    step: StepFn
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)  # every step's, warmup included
    seconds: float = 0.0  # timed steps only
    tokens: int = 0  # timed steps only
    steps: int = 0  # timed steps only
    step_growth: int | None = None  # bytes a step allocates above what the loop holds

    def persistent_bytes(self) -> int:
        """Weights, buffers and optimizer state: what the loop holds between steps."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags, and the rest as titan `--section.key value` overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config", required=True, help="titan TOML, e.g. titan/train_configs/debug_model.toml"
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first (>= 1)")
    p.add_argument("--chunk", type=int, default=5, help="timed steps per alternating chunk")
    p.add_argument("--vs-hf", action="store_true", help="also time a transformers training loop")
    ns, overrides = p.parse_known_args(argv)
    if ns.steps < 1 or ns.warmup < 1 or ns.chunk < 1:
        p.error("--steps, --warmup and --chunk must be >= 1")
    return ns, overrides


def build_config(ns: argparse.Namespace, overrides: list[str]) -> JobConfig:
    """The TOML plus overrides, with synthetic data by default and nothing written to disk."""
    user_sets_data = any(arg.startswith("--data.") for arg in overrides)
    defaults = [] if user_sets_data else ["--data.dataset", "synthetic"]
    forced = [
        # The LR schedule spans exactly the benchmark's steps.
        "--training.steps", str(ns.warmup + ns.steps),
        "--checkpoint.enable", "false",
        "--profiling.enable_profiling", "false",
        "--profiling.enable_memory_snapshot", "false",
        "--metrics.enable_tensorboard", "false",
        "--metrics.enable_wandb", "false",
    ]  # fmt: skip
    return load_config(defaults + overrides + forced, config_file=ns.config)


def draw_batches(trainer: Trainer, n_steps: int) -> list[Batch]:
    """Draw every step's micro-batches once, so both loops train on the identical tensors."""
    data = iter(trainer.dataloader)
    return [[next(data) for _ in range(trainer.grad_accum_steps)] for _ in range(n_steps)]


def build_hf_model(trainer: Trainer) -> nn.Module:
    """transformers' LlamaForCausalLM holding titan's current (initial) weights, in fp32."""
    import transformers  # slow import: only with --vs-hf
    from transformers import LlamaConfig, LlamaForCausalLM

    # Its config check warns that the RoPE scaling's original context (8192) exceeds
    # max_position_embeddings (= seq_len); that does not change the frequencies, and the
    # first-step loss check below shows both models compute the same function.
    transformers.logging.set_verbosity_error()

    # use_cache=False: otherwise every training forward also fills a KV cache it never reads.
    config = LlamaConfig(
        **hf_config_dict(trainer.model_args), attn_implementation="sdpa", use_cache=False
    )
    with torch.device(trainer.device):
        model = LlamaForCausalLM(config)
    state = to_hf(trainer.model.state_dict(), trainer.model_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if trainer.model_args.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"titan -> HF weights: missing {missing}, unexpected {unexpected}")
    return model.train()


def build_hf_optimizer(
    trainer: Trainer, model: nn.Module
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """titan's optimizer class, hyperparameters and param groups (split by ndim), and schedule."""
    ref = trainer.optimizer
    group_of_ndim: dict[int, int] = {}
    for i, group in enumerate(ref.param_groups):
        for p in group["params"]:
            if group_of_ndim.setdefault(p.ndim, i) != i:
                raise RuntimeError("titan's param groups are not split by ndim: cannot replicate")
    groups = []
    for g in ref.param_groups:
        settings = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
        # LambdaLR already scaled g["lr"] by the first factor; the base is in initial_lr.
        groups.append({**settings, "lr": g.get("initial_lr", g["lr"]), "params": []})
    for p in model.parameters():
        groups[group_of_ndim[p.ndim]]["params"].append(p)
    accepted = inspect.signature(type(ref)).parameters  # AdamW's defaults hold extra keys
    kwargs = {k: v for k, v in ref.defaults.items() if k in accepted and k != "params"}
    optimizer = type(ref)([g for g in groups if g["params"]], **kwargs)
    cfg = trainer.cfg
    schedule = functools.partial(lr_factor, total_steps=cfg.training.steps, cfg=cfg.lr_scheduler)
    scheduler = LambdaLR(optimizer, schedule)
    if scheduler.get_last_lr() != trainer.lr_scheduler.get_last_lr():
        raise RuntimeError("the HF loop's learning rates differ from titan's")
    return optimizer, scheduler


def titan_loop(trainer: Trainer) -> Loop:
    """titan's own step: Trainer.train_step, exactly as its training loop calls it."""

    def step(microbatches: Batch) -> float:
        return trainer.train_step(microbatches)[0]

    return Loop("titan", step, trainer.model, trainer.optimizer)


def hf_loop(trainer: Trainer) -> Loop:
    """The plain loop: forward, summed cross-entropy / target count, backward, clip, step."""
    model = build_hf_model(trainer)
    optimizer, scheduler = build_hf_optimizer(trainer, model)
    device, dtype = trainer.device, trainer.compute_dtype
    max_norm = trainer.cfg.training.max_norm
    params = list(model.parameters())

    def step(microbatches: Batch) -> float:
        n_targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
        total = torch.zeros((), device=device)
        for inputs, labels in microbatches:
            inputs, labels = inputs.to(device), labels.to(device)
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=inputs).logits
            flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten(0, 1)
            loss_sum = F.cross_entropy(
                flat_logits, flat_labels, reduction="sum", ignore_index=IGNORE_INDEX
            )
            loss = loss_sum / n_targets
            loss.backward()
            total += loss.detach()
        if max_norm > 0:  # foreach, as titan clips
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total.item()

    return Loop("hf", step, model, optimizer)


class RssSampler:
    """Peak resident memory of the process above its level on entry, sampled by a thread.

    Freed heap memory stays resident under glibc, so a later loop could reuse what an earlier
    one freed without growing the RSS: malloc_trim(0) on entry hands it back to the kernel first.
    """

    def __init__(self, interval_s: float = 2e-4) -> None:
        self.interval_s = interval_s
        self.peak_growth: int | None = None
        self._base: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "RssSampler":
        gc.collect()
        libc_name = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
        if trim is not None:
            trim(0)
        self._base = _rss_bytes()
        if self._base is not None:
            self.peak_growth = 0
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            if rss is not None and self._base is not None:
                self.peak_growth = max(self.peak_growth or 0, rss - self._base)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # no procfs (not Linux): the CPU figure is then unknown


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(loops: list[Loop], batches: list[Batch], device: torch.device) -> None:
    """Untimed steps, loop after loop on each batch; on CPU the last one measures memory.

    The first step is never the memory probe: the optimizer allocates its state lazily there.
    """
    for i, microbatches in enumerate(batches):
        probe = device.type != "cuda" and 0 < i == len(batches) - 1
        for loop in loops:
            if not probe:
                loop.losses.append(loop.step(microbatches))
                continue
            with RssSampler() as sampler:
                loop.losses.append(loop.step(microbatches))
            loop.step_growth = sampler.peak_growth


def timed(loops: list[Loop], batches: list[Batch], device: torch.device, chunk: int) -> None:
    """Timed steps in chunks, alternating the loops (A B, then B A, ...) against drift."""
    for n, start in enumerate(range(0, len(batches), chunk)):
        for loop in loops if n % 2 == 0 else loops[::-1]:
            gc.collect()  # titan's loop collects on a schedule, never mid-step
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                # grads are None between steps: what is allocated now is both loops' state
                held = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            for microbatches in batches[start : start + chunk]:
                loop.losses.append(loop.step(microbatches))
                loop.tokens += sum(inputs.numel() for inputs, _ in microbatches)
                loop.steps += 1
            _sync(device)
            loop.seconds += time.perf_counter() - t0
            if device.type == "cuda":
                growth = torch.cuda.max_memory_allocated(device) - held
                loop.step_growth = max(loop.step_growth or 0, growth)


def report(loop: Loop, trainer: Trainer, peak: float | None) -> float:
    """Print one loop's block; returns its tokens/s."""
    tokens_per_s = loop.tokens / loop.seconds
    flops_per_s = tokens_per_s * trainer.flops_per_token
    mfu = f"{100 * flops_per_s / peak:.2f}%" if peak else "n/a (no peak FLOP/s for this device)"
    held = loop.persistent_bytes()
    if loop.step_growth is None:
        # On CPU the probe needs --warmup >= 2 and Linux's /proc.
        memory = f"n/a (weights + optimizer state {held / _MIB:,.1f} MiB; step growth unmeasured)"
    else:
        # Both loops share the process, so each one's peak is its own state plus its own
        # step's growth, not the device-wide figure.
        how = (
            "CUDA max_memory_allocated over the timed steps"
            if trainer.device.type == "cuda"
            else "host RSS sampled through one warmup step"
        )
        memory = (
            f"{(held + loop.step_growth) / _MIB:,.1f} MiB = weights + optimizer state "
            f"{held / _MIB:,.1f} + step growth {loop.step_growth / _MIB:,.1f} ({how})"
        )
    print(f"{loop.name}:")
    print(f"  tokens/s (per device): {tokens_per_s:,.0f}")
    print(f"  TFLOP/s:               {flops_per_s / 1e12:.4f}")
    print(f"  MFU:                   {mfu}")
    print(f"  peak memory:           {memory}")
    print(f"  step time:             {1e3 * loop.seconds / loop.steps:.1f} ms")
    return tokens_per_s


def main(argv: list[str] | None = None) -> int:
    ns, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(ns, overrides)
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    loops = [titan_loop(trainer)]
    if ns.vs_hf:
        loops.append(hf_loop(trainer))  # built before titan trains: same initial weights
    batches = draw_batches(trainer, ns.warmup + ns.steps)
    device, dtype = trainer.device, trainer.compute_dtype
    gc.disable()  # as titan's train loop does; collections happen between chunks only
    try:
        warm_up(loops, batches[: ns.warmup], device)
        timed(loops, batches[ns.warmup :], device, ns.chunk)
    finally:
        gc.enable()
    t = cfg.training
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # titan's own peak: bf16, or mixed bf16 + float8 when converters put matmuls on float8
    peak, label = trainer.metrics.peak_flops, trainer.metrics.peak_label
    if label:
        print(f"MFU against the {label.removeprefix('of ')}")
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model: {cfg.model.flavor}, {trainer.n_params:,} params, compute {dtype}; per step "
        f"{trainer.grad_accum_steps} x {t.local_batch_size} x {t.seq_len} tokens; "
        f"{ns.warmup} warmup + {ns.steps} timed steps, chunks of {ns.chunk}"
    )
    tokens_per_s = [report(loop, trainer, peak) for loop in loops]
    if ns.vs_hf:
        titan, hf = loops
        diffs = [abs(a - b) for a, b in zip(titan.losses, hf.losses, strict=True)]
        first = f"titan {titan.losses[0]:.6f}, hf {hf.losses[0]:.6f}"
        print(f"first-step loss abs diff: {diffs[0]:.3e} ({first})")
        # Informational: the trajectories drift apart by rounding (fast in bf16), not by design.
        print(f"max loss abs diff over all {len(diffs)} steps: {max(diffs):.3e}")
        print(f"ratio titan/hf: {tokens_per_s[0] / tokens_per_s[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
