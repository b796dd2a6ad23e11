"""Loss and perplexity of a titan DCP or Hugging Face checkpoint on a dataset, in any layout.

    titan-evaluate outputs/debug_model/checkpoint/step-1000 [--steps N] [--json-out eval.json]
    titan-evaluate outputs/debug_model/checkpoint/step-1000 --data.holdout_every 100
    titan-evaluate /models/Llama-3.1-8B --config llama3_8b.toml \
        --data.path /data/eval.jsonl --training.seq_len 8192 --training.local_batch_size 1
    torchrun --nproc-per-node 2 -m titan.cli.evaluate CKPT --parallelism.tensor_parallel_degree 2

CHECKPOINT is a DCP folder (a training or model-only checkpoint), a transformers folder
(config.json and safetensors; it must match model.flavor) or a Hugging Face hub id of one
(org/name[@revision]: its files are fetched into the hub cache, titan.hub). The config is
--config, else the run's own config.toml two folders above a DCP checkpoint
(outputs/debug_model/config.toml), else the debug model's; `--section.key value` overrides it as
in training. The data are --data.*: the documents that data.holdout_every holds out of training
when it is set (what validation during training reads), else the whole of data.dataset or
data.path, read once in order in windows of training.seq_len + 1 tokens,
training.local_batch_size per data-parallel rank; --steps limits the batches. Under torchrun the
parallel degrees come from --parallelism.*. Rank 0 shows a progress bar and prints a JSON
summary (loss = mean cross-entropy per target token, perplexity = exp(loss)).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from titan.config import JobConfig, load_config
from titan.config.job_config import Checkpoint, Metrics, Profiling, Validation
from titan.config.manager import SHIPPED_CONFIGS
from titan.errors import CheckpointError, ConfigError, DataError
from titan.hub import resolve_model_path
from titan.logger import init_logger, logger
from titan.models.llama3.load import checkpoint_args, checkpoint_kind
from titan.trainer.metrics import perplexity

DEBUG_TOML = SHIPPED_CONFIGS / "debug_model.toml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="DCP folder, transformers folder or hub id")
    p.add_argument("--config", type=Path, help="TOML (default: the run's config.toml)")
    p.add_argument("--steps", type=int, default=-1, help="batches (-1: one pass over the data)")
    p.add_argument("--json-out", type=Path, help="also write the summary here")
    return p.parse_known_args(argv)  # the rest: --section.key overrides


def eval_config(args: argparse.Namespace, overrides: list[str], fmt: str) -> JobConfig:
    """The run's config with the checkpoint as the initial weights and the data as validation."""
    toml = args.config
    run_config = args.checkpoint.resolve().parents[1] / "config.toml"
    if toml is None:
        toml = run_config if fmt == "dcp" and run_config.is_file() else DEBUG_TOML
    logger.info(f"evaluate: config {toml}")
    cfg = load_config(["--job.config_file", str(toml), *overrides])
    if fmt == "hf":  # config.json must be the flavor's architecture
        try:
            checkpoint_args(args.checkpoint, cfg.model.flavor)
        except ValueError as e:
            raise ConfigError(f"{e}\n(pass the matching --model.flavor)") from None
    d = cfg.data
    if d.holdout_every:
        validation = Validation(enable=True, steps=args.steps, dataset="holdout")
    else:  # the whole dataset; training reads nothing (synthetic tokens it never draws)
        validation = Validation(enable=True, steps=args.steps, dataset=d.dataset, path=d.path,
                                split=d.split)  # fmt: skip
        d = dataclasses.replace(d, dataset="synthetic", path=None, blend=[], blend_schedule=[])
    return dataclasses.replace(
        cfg, data=d, validation=validation, metrics=Metrics(), profiling=Profiling(),
        checkpoint=Checkpoint(initial_load_path=str(args.checkpoint),
                              initial_load_in_hf=fmt == "hf"),
    )  # fmt: skip


def evaluate(args: argparse.Namespace, overrides: list[str]) -> dict:
    from titan.trainer.trainer import (
        Trainer,  # after the arguments are checked: imports take seconds
    )

    args.checkpoint = resolve_model_path(str(args.checkpoint), "weights", "CHECKPOINT")
    fmt = checkpoint_kind(args.checkpoint)
    cfg = eval_config(args, overrides, fmt)
    with tempfile.TemporaryDirectory() as dump:  # nothing of the run's folder is written
        cfg = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, dump_folder=dump))
        trainer = Trainer(cfg)
        start = time.perf_counter()
        loss, n = trainer.validate(progress=trainer.rank == 0)
        trainer.metrics.close()
    v, t = trainer.validator, cfg.training
    return {
        "checkpoint": str(args.checkpoint), "format": fmt, "flavor": cfg.model.flavor,
        "data": v.name, "loss": loss, "perplexity": perplexity(loss),
        "targets": n, "batches": v.steps, "windows": v.steps * t.local_batch_size * v.dp_degree,
        "seq_len": t.seq_len, "layout": trainer.parallel_dims.describe(),
        "world_size": trainer.parallel_dims.world_size,
        "seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    init_logger()
    try:
        summary = evaluate(args, overrides)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        logger.error(str(e))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json_out is not None:
            args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
