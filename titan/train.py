"""The training entry point (command `titan-train`): load the config, then train, dry-run or
write a seed checkpoint.

Run: CONFIG_FILE=titan/train_configs/debug_model.toml ./run_train.sh [--section.key value ...]
  or titan-train --job.config_file debug_model.toml [--help]
  or python -m titan.train --job.config_file titan/train_configs/debug_model.toml
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from titan import faults
from titan.config import load_config
from titan.config.job_config import Parallelism
from titan.config.manager import help_text, to_toml
from titan.elastic_errors import write_error_file
from titan.errors import AnomalyError, CheckpointError, ConfigError, DataError
from titan.logger import init_logger, logger
from titan.parallelisms.distributed import comm_mode
from titan.trainer.ft_trainer import FaultTolerantTrainer
from titan.trainer.preemption import Preempted, log_preempted
from titan.trainer.trainer import Trainer


def _fail(message: str, status: int) -> int:
    """Log a handled error on this rank (ERROR reaches stderr on every rank) and leave it for
    torchrun's summary, which is all a user sees of a rank that LOG_RANK hides."""
    logger.error(message)
    write_error_file(message)
    return status


# @record: an exception titan does not handle reaches torchrun's summary with its traceback
@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + help_text())
        return 0
    init_logger()
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(argv)
        if faults.fault("config_error", 0, rank):
            raise ConfigError(f"rank {rank} rejects the config ({faults.ENV} config_error)")
    except ConfigError as e:
        return _fail(f"bad config: {e}", 2)
    dump = Path(cfg.job.dump_folder)
    dump.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (dump / "config.toml").write_text(to_toml(cfg))
    if cfg.job.print_config:
        logger.info("effective config:\n" + to_toml(cfg))
    try:
        if cfg.checkpoint.create_seed_checkpoint:
            # one process, whatever the config's layout: the seed is the full, unsharded model
            cfg = dataclasses.replace(cfg, parallelism=Parallelism())
        # a dry run traces one torchft group: its step, not the quorum (no lighthouse)
        trainer_cls = FaultTolerantTrainer if cfg.fault_tolerance.enable else Trainer
        if comm_mode() == "fake_backend":
            from titan.trainer import dry_run  # only a dry run traces

            return dry_run.main(cfg, trainer_cls)
        trainer = trainer_cls(cfg)
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save_model_only(step=0)
            return 0
        trainer.train()
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, AnomalyError) as e:
        return _fail(str(e), 1)
    except Preempted as e:
        trainer.metrics.close()  # flush the metrics of the steps before the signal
        write_error_file(f"preempted: {e}")  # a rank signalled alone: its summary says why
        return log_preempted(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
