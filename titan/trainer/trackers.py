"""TensorBoard and Weights & Biases for MetricsLogger, continued across restarts: a resumed job
keeps its W&B run (the id is kept in the dump folder) and TensorBoard drops the steps it repeats.
"""

import os
import secrets
from pathlib import Path
from typing import Any

from titan.config.job_config import Metrics
from titan.errors import ConfigError
from titan.logger import logger

WANDB_ID_FILE = "wandb_run_id"


def open_tensorboard(log_dir: str, cfg: Metrics, rank: int, start_step: int) -> Any:
    """A SummaryWriter for a run that starts after `start_step` (0: from scratch). Its events
    hide the folder's earlier ones from step start_step + 1 on: the steps a restart repeats are
    seen once, with the values of the run that wrote them last."""
    # Imported here: tensorboard takes seconds to import, most runs leave it off, and it is the
    # optional extra `trackers`.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise missing_tracker("metrics.enable_tensorboard", "tensorboard") from None

    if not cfg.rank_0_only:
        log_dir = os.path.join(log_dir, f"rank_{rank}")  # one run per rank, not interleaved
    logger.info(f"TensorBoard logs go to {log_dir}")
    return SummaryWriter(log_dir=log_dir, purge_step=start_step + 1)


def wandb_run_id(dump_folder: str, rank: int, rank_0_only: bool, new_id: str) -> str:
    """The W&B run id kept in the dump folder (one file per rank without rank_0_only), written
    with `new_id` the first time, so that every restart of the job continues one run."""
    name = WANDB_ID_FILE if rank_0_only else f"{WANDB_ID_FILE}_rank{rank}"
    path = Path(dump_folder) / name
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    tmp = path.with_name(f".{name}.tmp")  # a crash mid-write leaves no half-written id
    tmp.write_text(new_id + "\n")
    os.replace(tmp, path)
    return new_id


def open_wandb(
    cfg: Metrics, dump_folder: str, rank: int, config_dict: dict | None, run_name: str
) -> Any:
    """The job's W&B run, named job.description or else the dump folder's name (then -rankN
    without rank_0_only), resumed when an earlier start of the job opened it."""
    try:
        import wandb  # slow to import; only when enabled
    except ImportError:
        raise missing_tracker("metrics.enable_wandb", "wandb") from None

    os.makedirs(dump_folder, exist_ok=True)
    name = run_name or os.path.basename(os.path.abspath(dump_folder))
    if not cfg.rank_0_only:
        name = f"{name}-rank{rank}"
    # W&B's own id form: lowercase letters and digits
    run_id = wandb_run_id(dump_folder, rank, cfg.rank_0_only, secrets.token_hex(6))
    run = wandb.init(
        project=cfg.wandb_project, dir=dump_folder, config=config_dict, name=name, id=run_id,
        resume="allow",
    )  # fmt: skip
    logger.info(f"W&B run {run.name} ({run.id}, {os.environ.get('WANDB_MODE', 'online')} mode)")
    return run


def missing_tracker(key: str, package: str) -> Exception:
    """A ConfigError (train's main prints it as one line) for a tracker whose package is absent."""
    return ConfigError(f"{key} needs {package}: pip install 'titan[trackers]' (or turn it off)")
