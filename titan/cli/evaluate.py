"""Loss and perplexity of a titan DCP or Hugging Face checkpoint on a dataset, in any layout.

    titan-evaluate outputs/debug_model/checkpoint/step-1000 [--steps N] [--json-out eval.json]
    titan-evaluate outputs/debug_model/checkpoint/step-1000 --data.holdout_every 100
    titan-evaluate /models/Llama-3.1-8B --config llama3_8b.toml \
        --data.path /data/eval.jsonl --training.seq_len 8192 --training.local_batch_size 1
    torchrun --nproc-per-node 2 -m titan.cli.evaluate CKPT --parallelism.tensor_parallel_degree 2
    titan-evaluate /models/Llama-3.2-1B --tasks hellaswag,arc_easy --limit 100 --output res.json
    titan-evaluate CKPT --flavor 8B --tasks mytask --include-path my_tasks/ --batch-size 16

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

With --tasks (the `eval` extra: pip install titan[eval]) it runs lm-evaluation-harness tasks
instead, through titan.cli.lm_eval_backend (loglikelihood, rolling loglikelihood, greedy
generate_until with the KV cache), and prints (--output: writes) lm-eval's results JSON. The
architecture: an HF folder's config.json, else --flavor or --config-json; the tokenizer as
titan-generate picks it (--tokenizer); --include-path adds a folder of task YAMLs; under torchrun
the model is tensor parallel over all processes.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from titan.config import JobConfig, load_config
from titan.config.job_config import Checkpoint, Metrics, Profiling, Validation
from titan.config.manager import SHIPPED_CONFIGS
from titan.data.tokenizer import build_tokenizer
from titan.errors import CheckpointError, ConfigError, DataError
from titan.hub import resolve_model_path
from titan.logger import init_logger, logger
from titan.models.llama3.load import checkpoint_args, checkpoint_kind, load_model
from titan.parallelisms.distributed import init_distributed
from titan.trainer.metrics import perplexity
from titan.trainer.runtime import pick_device

DEBUG_TOML = SHIPPED_CONFIGS / "debug_model.toml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="DCP folder, transformers folder or hub id")
    p.add_argument("--config", type=Path, help="TOML (default: the run's config.toml)")
    p.add_argument("--steps", type=int, default=-1, help="batches (-1: one pass over the data)")
    p.add_argument("--json-out", type=Path, help="also write the summary here")
    t = p.add_argument_group("lm-evaluation-harness (--tasks)")
    t.add_argument("--tasks", help="comma-separated lm-eval task names")
    t.add_argument("--include-path", type=Path, help="a folder of extra task YAMLs")
    t.add_argument("--limit", type=int, help="at most this many documents per task")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, help="tokens per window (default: max_seq_len)")
    t.add_argument("--output", type=Path, help="also write lm-eval's results JSON here")
    t.add_argument("--log-samples", action="store_true", help="keep per-request samples")
    t.add_argument("--flavor", help="architecture of a DCP checkpoint")
    t.add_argument("--config-json", type=Path, help="architecture from a transformers config")
    t.add_argument("--tokenizer", help="tokenizer file (default: as titan-generate picks it)")
    t.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
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


def evaluate_tasks(args: argparse.Namespace, overrides: list[str]) -> dict:
    """lm-eval's results of --tasks on the checkpoint (tensor parallel under torchrun)."""
    if overrides:
        raise ConfigError(f"--tasks takes no --section.key overrides, got {' '.join(overrides)}")
    try:
        from titan.cli.lm_eval_backend import TitanLM, run_tasks
    except ImportError:
        raise ConfigError("--tasks needs lm-eval: pip install 'titan[eval]'") from None
    from titan.cli.generate import tokenizer_path

    args.checkpoint = resolve_model_path(str(args.checkpoint), "weights", "CHECKPOINT")
    try:
        model_args = checkpoint_args(args.checkpoint, args.flavor, args.config_json)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tp = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    mesh = None
    if tp > 1:
        init_distributed(device, tp)
        mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    model = load_model(args.checkpoint, model_args, device, torch.float32, mesh)
    lm = TitanLM(model, build_tokenizer(tokenizer_path(args)), args.batch_size,
                 args.max_length, tp_mesh=mesh)  # fmt: skip
    tasks = [t for t in args.tasks.split(",") if t]
    return run_tasks(lm, tasks, args.include_path, args.limit, args.log_samples)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    init_logger()
    try:
        if args.tasks:
            summary = evaluate_tasks(args, overrides)
        else:
            summary = evaluate(args, overrides)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        text = json.dumps(summary, indent=2)
        print(text)
        for out in (args.json_out, args.output):
            if out is not None:
                out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
