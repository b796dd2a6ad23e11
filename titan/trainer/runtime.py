"""The process's device and random state, the accumulation count, and the non-finite-loss stop,
from [training]."""

import os

import torch

from titan.config.job_config import Training
from titan.data.tokens import first_window
from titan.errors import ConfigError


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


def compute_dtype(device: torch.device, dry_run: bool, mixed_precision_param: str) -> torch.dtype:
    """bfloat16 on a GPU (and in a dry run, which traces the GPU run) when the config asks for
    it; float32 on CPU, whose bf16 matmuls are slow and whose runs compare fp32 numerics."""
    gpu = device.type == "cuda" or dry_run
    return torch.bfloat16 if gpu and mixed_precision_param == "bfloat16" else torch.float32


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def grad_accumulation_steps(cfg: Training, dp_degree: int) -> list[tuple[int, int]]:
    """[(first window, accumulation steps)]: from global_batch_size, then from each
    batch_size_schedule entry on (its token count in windows of seq_len, rounded up)."""
    per_pass = cfg.local_batch_size * dp_degree
    global_batch = per_pass if cfg.global_batch_size == -1 else cfg.global_batch_size
    phases = [(0, global_batch, "training.global_batch_size")]
    for entry in cfg.batch_size_schedule:
        fields = entry.split()
        try:
            tokens, size = float(fields[0]), int(fields[1])
            assert len(fields) == 2 and tokens >= 0 and size > 0
        except (ValueError, IndexError, AssertionError):
            raise ConfigError(f"training.batch_size_schedule entry {entry!r} is not 'TOKENS "
                              "GLOBAL_BATCH_SIZE' (e.g. '252e6 1024')") from None  # fmt: skip
        if tokens < phases[-1][0] * cfg.seq_len:
            raise ConfigError("training.batch_size_schedule entries must be in increasing "
                              "token order")  # fmt: skip
        start = first_window(tokens, cfg.seq_len)
        phases.append((start, size, f"batch_size_schedule {entry!r}"))
    for _, size, key in phases:
        if size % per_pass:
            raise ConfigError(
                f"{key}: global batch {size} is not divisible by local_batch_size "
                f"{cfg.local_batch_size} x data-parallel degree {dp_degree} = {per_pass}"
            )
    return [(start, size // per_pass) for start, size, _ in phases]
