"""Training metrics: FLOPs per token, peak-FLOP/s table for MFU, device memory, and the
MetricsLogger that writes the fixed metrics line, <dump_folder>/metrics.jsonl (rank 0: one JSON
object per logged step, what titan-plot reads), TensorBoard and Weights & Biases.
"""

import json
import math
import os
import resource
import sys
from typing import Any

import torch

from titan.config.job_config import Metrics
from titan.logger import logger
from titan.trainer.trackers import open_tensorboard, open_wandb

_GIB = 1024**3
METRICS_FILE = "metrics.jsonl"


def flops_per_token(
    num_params: int,
    num_embedding_params: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    seq_len: int,
) -> int:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (forward 2 + backward 4 per multiply-add).

    N = num_params - num_embedding_params: the input embedding is a lookup, not a matmul, so its
    parameters do no FLOPs; pass num_embedding_params=0 when it is tied to the output projection,
    whose matmul does count. 12·L·H·Q·T counts the attention scores and the weighted sum of values
    (L layers, H heads, Q head_dim, T seq_len) without halving for the causal mask, by convention.
    """
    sizes = (num_params, num_embedding_params, n_layers, n_heads, head_dim, seq_len)
    if min(sizes) < 0 or num_embedding_params > num_params:
        raise ValueError(
            f"flops_per_token needs non-negative sizes with embedding <= total: {sizes}"
        )
    dense = 6 * (num_params - num_embedding_params)
    attention = 12 * n_layers * n_heads * head_dim * seq_len
    return dense + attention


# Dense (no sparsity) peak FLOP/s per GPU. NVIDIA's datasheets print tensor-core figures "with
# sparsity", i.e. twice the dense rate, so each entry is the printed number halved. Rows are
# tried in order and every substring must occur in the upper-cased device name, so the more
# specific names (GB200 before B200, GH200 and H200 NVL before H200) come first.
_PEAK_FLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    # NVIDIA GB200 NVL72 datasheet: one GB200 superchip (2 GPUs) lists FP16/BF16 10 PFLOPS and
    # FP8 20 PFLOPS with sparsity -> per GPU 2.5 / 5 PFLOPS dense.
    # (NVFP4: the GB200 superchip lists FP4 40 PFLOPS sparse for its two GPUs.)
    (("GB200",), {"bfloat16": 10e15 / 2 / 2, "float8": 20e15 / 2 / 2, "nvfp4": 40e15 / 2 / 2}),
    # NVIDIA HGX B200 datasheet: 8 GPUs list FP16/BF16 36 PFLOPS and FP8 72 PFLOPS with
    # sparsity -> per GPU 2.25 / 4.5 PFLOPS dense.
    # (NVFP4: FP4 144 PFLOPS sparse for the 8 GPUs.)
    (("B200",), {"bfloat16": 36e15 / 8 / 2, "float8": 72e15 / 8 / 2, "nvfp4": 144e15 / 8 / 2}),
    # NVIDIA GH200 Grace Hopper Superchip datasheet: BF16 1,979 and FP8 3,958 TFLOPS sparse.
    (("GH200",), {"bfloat16": 1979e12 / 2, "float8": 3958e12 / 2}),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column: BF16 1,671 and FP8 3,341 TFLOPS.
    (("H200", "NVL"), {"bfloat16": 1671e12 / 2, "float8": 3341e12 / 2}),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: BF16 1,979 and FP8 3,958 TFLOPS.
    (("H200",), {"bfloat16": 1979e12 / 2, "float8": 3958e12 / 2}),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column: BF16 1,671 and FP8 3,341 TFLOPS.
    (("H100", "NVL"), {"bfloat16": 1671e12 / 2, "float8": 3341e12 / 2}),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: BF16 1,513 and FP8 3,026 TFLOPS.
    (("H100", "PCIE"), {"bfloat16": 1513e12 / 2, "float8": 3026e12 / 2}),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 1,979 and FP8 3,958 TFLOPS.
    # The SXM5 part reports itself as "NVIDIA H100 80GB HBM3".
    (("H100", "HBM3"), {"bfloat16": 1979e12 / 2, "float8": 3958e12 / 2}),
    (("H100", "SXM"), {"bfloat16": 1979e12 / 2, "float8": 3958e12 / 2}),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe, 40 and 80 GB): BF16 312 TFLOPS dense
    # (624 sparse). Ampere has no FP8 tensor cores.
    (("A100",), {"bfloat16": 624e12 / 2}),
]

_PRECISION_ALIASES = {"bf16": "bfloat16", "fp8": "float8"}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device at `precision` ("bfloat16", "float8" or "nvfp4").

    `device_name` is torch.cuda.get_device_name(). Unknown devices (CPU included), MIG slices
    (a fraction of the chip) and precisions the table lacks give None: MFU is then unknown.
    """
    name = device_name.upper()
    precision = _PRECISION_ALIASES.get(precision, precision)
    if "MIG" in name.split():
        return None
    for needles, peaks in _PEAK_FLOPS:
        if all(needle in name for needle in needles):
            return peaks.get(precision)
    return None


def model_flops(
    args,
    n_params: int,
    float8_flops: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    low_precision: str = "float8",
) -> tuple[int, float | None, str]:
    """(training FLOPs per token, the peak FLOP/s MFU is measured against, a label naming that
    peak when float8 matmuls mix with bf16 ones) for a Llama 3 model with `args`; `float8_flops`
    of the FLOPs per token run on low-precision tensor cores, float8 ones (float8, MX) or
    `low_precision` = "nvfp4" ones."""
    embedding = 0 if args.tie_word_embeddings else args.vocab_size * args.dim
    fpt = flops_per_token(
        n_params, embedding, args.n_layers, args.n_heads, args.head_dim, args.max_seq_len
    )
    if device.type != "cuda":
        return fpt, None, ""
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, str(compute_dtype).split(".")[-1])
    if not float8_flops:
        return fpt, peak, ""
    peak = mixed_precision_peak(fpt, float8_flops, peak, peak_flops(name, low_precision))
    return fpt, peak, f"of bf16 + {low_precision} peaks"


def mixed_precision_peak(
    flops_per_token: float,
    float8_flops_per_token: float,
    peak_bf16: float | None,
    peak_float8: float | None,
) -> float | None:
    """The peak FLOP/s of a step that runs `float8_flops_per_token` of its FLOPs on float8 tensor
    cores and the rest in bf16: its FLOPs over the time a device at both peaks needs for them.
    MFU against it is 100% only when every FLOP runs at its own precision's peak; against the
    bf16 peak alone, float8 could claim over 100%, against the float8 peak alone the bf16 part
    (attention, the output layer) would look slow."""
    if peak_bf16 is None or (float8_flops_per_token and peak_float8 is None):
        return None
    bf16_flops = flops_per_token - float8_flops_per_token
    seconds = bf16_flops / peak_bf16 + (float8_flops_per_token / peak_float8 if peak_float8 else 0)
    return flops_per_token / seconds


class DeviceMemoryMonitor:
    """Peak memory of one device: the CUDA caching allocator's, or the process's host memory.

    On CPU (and any non-CUDA device) the figure is the process's peak resident set, which the
    kernel tracks from process start: it cannot be reset, so reset_peak() does nothing there.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            self.total_bytes: int | None = torch.cuda.get_device_properties(
                self.device
            ).total_memory
        else:
            self.total_bytes = _host_total_bytes()
        self.reset_peak()

    def peak(self) -> tuple[int, float | None]:
        """(peak bytes since the last reset, that as % of the device's memory or None)."""
        if self.is_cuda:
            # Reserved, not allocated: what the allocator holds is what runs out first.
            peak_bytes = torch.cuda.max_memory_reserved(self.device)
        else:
            peak_bytes = _host_peak_rss_bytes()
        pct = 100.0 * peak_bytes / self.total_bytes if self.total_bytes else None
        return peak_bytes, pct

    def stats(self) -> dict[str, int]:
        """CUDA allocator counters: peak allocated/reserved bytes, alloc retries and OOMs."""
        if not self.is_cuda:
            return {}
        mem = torch.cuda.memory_stats(self.device)
        return {
            "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            "num_alloc_retries": mem.get("num_alloc_retries", 0),
            "num_ooms": mem.get("num_ooms", 0),
        }

    def reset_peak(self) -> None:
        """Start a new peak window (CUDA only; the CPU peak RSS cannot be reset)."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def _host_peak_rss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _host_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def perplexity(loss: float) -> float:
    """exp(mean token loss), inf past the float range."""
    return math.exp(loss) if loss < 709 else math.inf


class MetricsLogger:
    """Turns per-interval counts into metrics, logs the fixed metrics line and, when enabled,
    writes the same scalars to TensorBoard and Weights & Biases (titan.trainer.trackers), for a
    run that resumes after `start_step` (0: from scratch)."""

    def __init__(
        self,
        cfg: Metrics,
        dump_folder: str,
        *,
        rank: int,
        device: torch.device,
        flops_per_token: int,
        peak_flops: float | None,
        config_dict: dict | None = None,
        peak_label: str = "",
        run_name: str = "",
        start_step: int = 0,
    ) -> None:
        self.cfg = cfg
        self.peak_label = peak_label  # names the peak MFU is against when it is not plain bf16
        self.rank = rank
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.memory = DeviceMemoryMonitor(device)
        self._alloc_retries = 0
        self._tb: Any = None
        self._wandb_run: Any = None
        # rank 0's metrics.jsonl, opened at the first write and appended to (a resumed run
        # continues its file)
        self._jsonl_path = os.path.join(dump_folder, METRICS_FILE) if rank == 0 else None
        self._jsonl: Any = None
        if cfg.rank_0_only and rank != 0:
            return  # only the logging rank writes TensorBoard and W&B
        if cfg.enable_tensorboard:
            tb_dir = os.path.join(dump_folder, cfg.save_tb_folder)
            self._tb = open_tensorboard(tb_dir, cfg, rank, start_step)
            if run_name:
                self._tb.add_text("run", run_name)
        if cfg.enable_wandb:
            self._wandb_run = open_wandb(cfg, dump_folder, rank, config_dict, run_name)

    def should_log(self, step: int, last_step: int) -> bool:
        """Whether 1-based `step` gets a metrics line: every log_freq steps, the first, the last."""
        return step == 1 or step == last_step or step % self.cfg.log_freq == 0

    def log(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        ntokens: int,
        elapsed_s: float,
        data_s: float,
        extra: dict[str, float] | None = None,
    ) -> dict[str, float | None]:
        """Log one interval: `ntokens` this device processed in `elapsed_s` seconds since the last
        log, `data_s` of them waiting for data. Returns the metric values (mfu_pct None when the
        device's peak is unknown) and starts a new peak-memory window."""
        if elapsed_s <= 0:
            raise ValueError(f"elapsed_s must be positive, got {elapsed_s}")
        tokens_per_s = ntokens / elapsed_s
        flops_per_s = tokens_per_s * self.flops_per_token
        peak_bytes, memory_pct = self.memory.peak()
        metrics: dict[str, float | None] = {
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tokens_per_s": tokens_per_s,
            "tflops": flops_per_s / 1e12,
            "mfu_pct": 100.0 * flops_per_s / self.peak_flops if self.peak_flops else None,
            "memory_gib": peak_bytes / _GIB,
            "memory_pct": memory_pct,
            "data_pct": 100.0 * data_s / elapsed_s,
        }
        self._check_alloc_retries(step)
        metrics.update(extra or {})
        logger.info(_format_line(step, metrics, extra or {}, self.peak_label))
        self._write(step, metrics)
        self.memory.reset_peak()
        return metrics

    def log_validation(self, step: int, loss: float, n_targets: int, elapsed_s: float) -> None:
        """Log a validation pass after `step`: its mean token loss over `n_targets` targets."""
        ppl = perplexity(loss)
        logger.info(
            f"validation: step: {step:<5d}  loss: {loss:.6f}  perplexity: {ppl:.4f}  "
            f"targets: {n_targets:,}  time: {elapsed_s:.1f}s"
        )
        self._write(step, {"validation/loss": loss, "validation/perplexity": ppl})

    def close(self) -> None:
        """Flush and close metrics.jsonl and TensorBoard, and finish the W&B run."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _check_alloc_retries(self, step: int) -> None:
        # A retry means the allocator had to free its cache and synchronize to find memory:
        # training still runs, but slowly, so it is worth a warning.
        retries = self.memory.stats().get("num_alloc_retries", 0)
        if retries > self._alloc_retries:
            logger.warning(
                f"step {step}: {retries - self._alloc_retries} CUDA allocation retries since the "
                "last log (memory is near full; expect slow steps)"
            )
        self._alloc_retries = retries

    def _write(self, step: int, metrics: dict[str, float | None]) -> None:
        scalars = {k: v for k, v in metrics.items() if v is not None}
        if self._jsonl is None and self._jsonl_path is not None:
            os.makedirs(os.path.dirname(self._jsonl_path) or ".", exist_ok=True)
            self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115 (closed by close())
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()  # a killed run keeps what it logged
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)


def _format_line(
    step: int, m: dict[str, float | None], extra: dict[str, float], peak_label: str = ""
) -> str:
    mfu = "n/a" if m["mfu_pct"] is None else f"{m['mfu_pct']:.2f}%"
    if peak_label and m["mfu_pct"] is not None:
        mfu += f" ({peak_label})"
    memory = f"{m['memory_gib']:.2f}GiB"
    if m["memory_pct"] is not None:
        memory += f"({m['memory_pct']:.1f}%)"
    parts = [
        f"step: {step:<5d}",
        f"loss: {m['loss']:.6f}",
        f"grad_norm: {m['grad_norm']:.4f}",
        f"lr: {m['lr']:.2e}",
        f"tokens/s: {m['tokens_per_s']:,.0f}",
        f"tflops: {m['tflops']:.2f}",
        f"mfu: {mfu}",
        f"memory: {memory}",
        f"data: {m['data_pct']:.1f}%",
    ]
    parts += [f"{key}: {value:.4g}" for key, value in extra.items()]
    return "  ".join(parts)
