"""The process's device and random state, the accumulation count, and the non-finite-loss stop,
from [training]."""

import os

import torch

from titan.config import ConfigError
from titan.config.job_config import Training


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


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/inf; the step was not applied."""


def grad_accumulation_steps(cfg: Training, dp_degree: int) -> int:
    per_pass = cfg.local_batch_size * dp_degree
    global_batch = per_pass if cfg.global_batch_size == -1 else cfg.global_batch_size
    if global_batch % per_pass:
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not divisible by local_batch_size "
            f"{cfg.local_batch_size} x data-parallel degree {dp_degree} = {per_pass}"
        )
    return global_batch // per_pass
