"""One case of the GPU check in its own process: titan's training step or the HF loop (through
benchmarks/throughput.py), generation (through benchmarks/generate.py), or titan's dry run of a
case's config. gpu_check.py starts it; by hand:

    python benchmarks/gpucheck/worker.py {titan|hf|generate|dry_run} SPEC_JSON RESULT_JSON

The spec is a case's (cases.py); the result is a JSON object with "status" and the figures.
"""

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS), str(ROOT)]  # throughput.py, generate.py and titan

import torch  # noqa: E402

from titan.models.llama3.args import FLAVORS  # noqa: E402
from titan.trainer.metrics import peak_flops  # noqa: E402

TOKENIZER = ROOT / "titan/assets/tokenizer/tokenizer.model"


def register_flavor(flavor: str, layers: int) -> str:
    """The name of `flavor` with `layers` blocks, added to titan's FLAVORS in this process.

    titan's config names a flavor and has no key for the number of blocks; the check's model is
    a flavor's shape with fewer blocks, so the worker registers it before titan reads the name.
    """
    name = f"{flavor}-{layers}-blocks"
    FLAVORS[name] = dataclasses.replace(FLAVORS[flavor], n_layers=layers)
    return name


def titan_overrides(spec: dict) -> list[str]:
    """titan `--section.key value` overrides of the case's TOML for its spec."""
    args = [
        "--model.flavor", register_flavor(spec["flavor"], spec["layers"]),
        "--model.tokenizer_path", str(TOKENIZER),
        "--model.attn_mask_type", spec["mask"],
        "--training.seq_len", str(spec["seq_len"]),
        "--training.local_batch_size", str(spec["batch"]),
        "--training.device", spec["device"],
        "--compile.enable", "true" if spec["compile"] else "false",
        "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "op",
        "--lr_scheduler.warmup_steps", "1",
        "--optimizer.name", spec.get("optimizer", "AdamW"),
    ]  # fmt: skip
    if spec["converters"]:
        args += ["--model.converters", ",".join(spec["converters"])]
        args += ["--quantize.linear.float8.recipe_name", spec["recipe"]]
        if not spec["float8_auto_filter"]:  # smoke: every linear is too small to gain
            args += ["--quantize.linear.float8.auto_filter_small_kn", "false"]
    return args


def run_training(leg: str, spec: dict) -> dict:
    """titan's Trainer.train_step (leg titan) or the plain HF loop (leg hf) on the same model,
    weights and batches, with throughput.py's warmup and timing."""
    import throughput as tp

    ns, overrides = tp.parse_args(
        ["--config", spec["config"], "--steps", str(spec["steps"]),
         "--warmup", str(spec["warmup"]), "--chunk", str(spec["steps"]), *titan_overrides(spec)]
    )  # fmt: skip
    overrides += ["--job.dump_folder", spec["dump_folder"]]
    trainer = tp.Trainer(tp.build_config(ns, overrides))
    # the HF loop is built from titan's initial weights, which stay held in this process
    loop = tp.titan_loop(trainer) if leg == "titan" else tp.hf_loop(trainer)
    batches = tp.draw_batches(trainer, ns.warmup + ns.steps)
    device = trainer.device
    gc.disable()  # as throughput.py and titan's loop: collections between chunks only
    try:
        tp.warm_up([loop], batches[: ns.warmup], device)
        tp.timed([loop], batches[ns.warmup :], device, ns.chunk)
    finally:
        gc.enable()
    tokens_per_s = loop.tokens / loop.seconds
    on_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    # titan's own peak (bf16, or bf16 + float8 mixed by its float8 share of FLOPs); the HF
    # loop's matmuls are bf16
    peak, label = trainer.metrics.peak_flops, trainer.metrics.peak_label
    if leg == "hf":
        peak, label = (peak_flops(name, "bfloat16") if on_cuda else None), ""
    held = loop.persistent_bytes()
    return {
        "status": "ok",
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * loop.seconds / loop.steps,
        "mfu": tokens_per_s * trainer.flops_per_token / peak if peak else None,
        "mfu_peak": label.removeprefix("of ") or "bf16 peak",
        "flops_per_token": trainer.flops_per_token,
        "n_params": trainer.n_params,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if on_cuda else None,
        # the loop's own weights, buffers and optimizer state plus its step's growth
        "loop_memory": held + loop.step_growth if loop.step_growth is not None else None,
        "first_loss": loop.losses[0],
        "device_name": name,
    }


def run_generate(spec: dict) -> dict:
    """benchmarks/generate.py's build and best-of-N run for each batch size."""
    import generate as gen

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = gen.build(spec["flavor"], spec["prompt_len"] + spec["new_tokens"], device, dtype)
    args = argparse.Namespace(
        prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"], repeats=spec["repeats"]
    )
    rows = []
    for batch in spec["batches"]:
        run = gen.best_run(model, batch, args)
        rows.append({
            "batch": batch,
            "prefill_tokens_per_s": run.prefill_tokens / run.prefill_s,
            "decode_tokens_per_s": run.decode_tokens / run.decode_s,
            "decode_ms_per_step": 1e3 * run.decode_s / (spec["new_tokens"] - 1),
        })  # fmt: skip
    # the report's tokens/s column: decoding at the smallest batch (one user's speed)
    return {"status": "ok", "tokens_per_s": rows[0]["decode_tokens_per_s"], "rows": rows,
            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def run_dry_run(spec: dict) -> dict:
    """titan's dry run (COMM_MODE=fake_backend, one rank) of the case's config: its traced peak."""
    if os.environ.get("COMM_MODE") != "fake_backend":
        raise RuntimeError("a dry run's worker needs COMM_MODE=fake_backend in its environment")
    from titan import train

    dump = Path(spec["dump_folder"])
    # off the GPU (the caller hides it): the trace is of the GPU run whatever training.device
    argv = ["--job.config_file", spec["config"], *titan_overrides(spec),
            "--job.dump_folder", str(dump), "--data.dataset", "synthetic",
            "--training.device", "auto", "--dry_run.memory_gib", "100000"]  # fmt: skip
    rc = train.main(argv)
    if rc != 0:
        return {"status": "failed", "reason": f"titan's dry run exited {rc}"}
    with open(dump / "dry_run.json") as f:
        rank = json.load(f)["ranks"][0]
    return {"status": "ok", "estimate_bytes": rank["total"], "parts": rank["peak"]}


def main(argv: list[str]) -> int:
    leg, spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    if leg in ("titan", "hf"):
        result = run_training(leg, spec)
    elif leg == "generate":
        result = run_generate(spec)
    elif leg == "dry_run":
        result = run_dry_run(spec)
    else:
        raise SystemExit(f"unknown leg {leg!r}: titan, hf, generate or dry_run")
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
