r"""Plan a titan run's parallel layout: the layouts titan accepts whose estimated memory fits,
ranked by estimated tokens/s per GPU, the best ones printed as TOML to paste into a config.

    titan-plan --flavor 70B --gpus 256 --seq-len 8192 --global-batch-tokens 16M
    titan-plan --flavor 405B --gpus 16384 --seq-len 8192 --global-batch-tokens 16M \
        [--memory-gib 80] [--gpu h100] [--top 20] [--float8 auto|on|off] [--toml 3]
    titan-plan --flavor 8B --gpus 8 --seq-len 8192 --global-batch-tokens 64K \
        --base-config titan/train_configs/llama3_8b.toml --write outputs/plan_8b.toml
    titan-plan ... --why "tp=16"     # titan's reasons against the layouts with tp 16
    titan-plan ... --verify 3        # trace the best 3 rows' steps (~10-90 s a row)
    titan-plan --explain             # the throughput model and what memory leaves out
    python scripts/plan.py ...       # the same, from a checkout without installing titan

Memory is titan.planning.memory_model's analytic estimate per GPU (the peak pipeline rank;
2 GiB kept for the CUDA context and NCCL), time titan.planning.throughput_model's stated
model. --why takes comma-separated key=value pins: tp, cp, pp, dp_replicate, schedule,
local_batch_size, ac (none, selective, full), float8 (true/false). --verify K dry-runs the best
K rows for real (COMM_MODE=fake_backend: titan traces the row's step on fake tensors, see
titan/trainer/dry_run.py), each merged into --base-config or the first shipped config of
the flavor, and prints each traced peak beside its estimate.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from titan.planning.memory_model import GIB, LEAVES_OUT
from titan.planning.plan_config import (
    Plan,
    Request,
    accept,
    overrides,
    parse_tokens,
    toml_block,
    toml_tables,
)
from titan.planning.planner import (
    candidates,
    describe,
    memory_of,
    nothing_fits,
    plan,
    split_label,
    time_of,
)
from titan.planning.throughput_model import GPUS, THROUGHPUT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the titan package

# the largest part's name in the memory column
SHORT = {"optimizer_state": "optimizer", "backward_temporaries": "bw temps",
         "gathered_parameters": "gathered", "communication_buffers": "comm"}  # fmt: skip
HEADER = (
    f"{'rank':>4} {'dp_rep':>6} {'dp_shard':>8} {'tp':>2} {'pp':>3} {'schedule':<38} {'cp':>2} "
    f"{'lbs':>3} {'mb':>3} {'acc':>3} {'AC':<9} {'f8':<3} {'memory GiB':<20} {'step s':>7} "
    f"{'tok/s/GPU':>9} {'MFU':>5} {'bubble':>6}"
)
VERIFY_HEADER = (
    f"{'rank':>4} {'estimate':>9} {'eager':>9} {'traced':>9} {'eager/traced':>12} "
    f"{'seconds':>7}  fits"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flavor", help="llama3 flavor: debugmodel, 1B, 3B, 8B, 70B, 405B")
    p.add_argument("--gpus", type=int, help="GPUs in the run")
    p.add_argument("--seq-len", type=int, default=8192, help="training.seq_len")
    p.add_argument("--global-batch-tokens", help="tokens per step, K/M suffixes (16M = 2^24)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--memory-gib", type=float, help="memory per GPU (default: the GPU's)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table")
    p.add_argument("--toml", type=int, default=3, help="best rows printed as TOML")
    p.add_argument("--float8", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--why", help='pins such as "tp=16,pp=2": why titan or memory rules them out')
    p.add_argument("--explain", action="store_true", help="print the throughput model")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="dry-run (trace) the best K rows for real and print their traced peaks "
                        "(~10-90 s a row; default 0: none)")  # fmt: skip
    p.add_argument("--verify-dir", help="keep --verify's configs and dry_run.json files here")
    p.add_argument("--base-config", help="the TOML a row is merged into for --write and "
                   "--verify (--verify's default: the flavor's first shipped config)")  # fmt: skip
    p.add_argument("--write", help="write the base config with the best row's keys here")
    args = p.parse_args(argv)
    if not args.explain and None in (args.flavor, args.gpus, args.global_batch_tokens):
        p.error("--flavor, --gpus and --global-batch-tokens are required (or --explain alone)")
    return args


def row(rank: int, p: Plan) -> str:
    c, t, m = p.candidate, p.time, p.memory
    d, par = c.dims, c.parallelism
    schedule = f"{par.pipeline_parallel_schedule} {split_label(par)}".strip() if d.pp > 1 else "-"
    micro = c.local_batch_size // par.pipeline_parallel_microbatch_size if d.pp > 1 else 1
    ac = c.ac_mode if c.compile_blocks else f"{c.ac_mode}*"
    memory = f"{m.total / GIB:5.1f} ({SHORT.get(m.dominant, m.dominant)})"
    return (
        f"{rank:>4} {d.dp_replicate:>6} {d.dp_shard:>8} {d.tp:>2} {d.pp:>3} "
        f"{schedule:<38} {d.cp:>2} {c.local_batch_size:>3} {micro:>3} {p.accumulation:>3} "
        f"{ac:<9} {'yes' if c.float8 else 'no':<3} {memory:<20} {t.step:>7.2f} "
        f"{t.tokens_per_s_per_gpu:>9,.0f} {t.mfu:>5.1%} {t.bubble:>6.1%}"
    )


def why(req: Request, pins: str) -> list[str]:
    """Titan's reasons (and memory) against every candidate with the pinned values."""
    fixed = {}
    for pin in pins.split(","):
        key, _, value = pin.strip().partition("=")
        if key == "float8":
            fixed[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            fixed[key] = int(value) if value.isdigit() else value
    reasons, fitting, over = collections.Counter(), [], []
    for cand in candidates(req, fixed):
        verdict = accept(req, cand)
        if isinstance(verdict, str):
            reasons[verdict] += 1
            continue
        memory = memory_of(req, verdict)
        (fitting if memory and memory.total <= req.budget else over).append((memory, verdict))
    n = sum(reasons.values()) + len(fitting) + len(over)
    lines = [f"{pins}: {n} layouts tried; titan refuses {sum(reasons.values())}, "
             f"{len(over)} do not fit in memory, {len(fitting)} fit"]  # fmt: skip
    lines += [f"  titan ({count}x): {reason}" for reason, count in reasons.most_common(5)]
    if fitting:
        timed = [(time_of(req, cand)[0], memory, cand) for memory, cand in fitting]
        time, memory, cand = min(timed, key=lambda t: t[0].step)
        lines.append(f"  best that fits: {time.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
                     f"{memory.total / GIB:.1f} GiB, {describe(cand)}")  # fmt: skip
    if over:
        memory, cand = min(over, key=lambda mc: mc[0].total if mc[0] else float("inf"))
        if memory:
            need = memory.total / GIB + req.reserve_gib
            lines.append(f"  smallest that does not fit: {need:.1f} GiB with the "
                         f"{req.reserve_gib:g} GiB reserve, {describe(cand)}")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.explain:
        print(THROUGHPUT_MODEL, "\n\n" + textwrap.fill("Memory estimate: " + LEAVES_OUT, 92))
        if args.flavor is None:
            return 0
    gpu = GPUS[args.gpu]
    try:
        req = Request(
            args.flavor, args.gpus, args.seq_len, parse_tokens(args.global_batch_tokens), gpu,
            args.memory_gib or gpu.memory_gib, args.float8,
        )  # fmt: skip
    except ValueError as e:
        print(f"titan-plan: {e}", file=sys.stderr)
        return 2
    if args.why:
        print("\n".join(why(req, args.why)))
        return 0
    result = plan(req)
    print(f"{req.flavor} on {req.gpus} x {gpu.name} ({req.memory_gib:g} GiB), seq_len "
          f"{req.seq_len}, {req.global_batch} sequences ({req.global_batch_tokens:,} tokens) "
          f"a step: {result.tried} layouts estimated, {len(result.plans)} fit and titan "
          f"accepts them, {result.refused} that fit titan refuses")  # fmt: skip
    if not result.plans:
        print(nothing_fits(req, result.smallest))
        return 1
    print(HEADER)
    shown = result.plans[: args.top]
    for rank, p in enumerate(shown, start=1):
        print(row(rank, p))
    if any(not p.candidate.compile_blocks for p in shown):
        print("(AC*: titan refuses compiled blocks for this layout: only the loss is compiled)")
    for rank, p in enumerate(result.plans[: args.toml], start=1):
        print("\n" + toml_block(req, p, rank), end="")
    if args.write:
        write_config(req, result.plans[0], args.base_config, args.write)
        print(f"\nwrote {args.write} ({args.base_config or 'titan defaults'} with rank 1's keys)")
    if args.verify:
        print()
        for line in verify(req, result.plans[: args.verify], args):
            print(line, flush=True)  # a row at a time: each takes a dry run
    return 0


def write_config(req: Request, row: Plan, base: str | None, out: str | Path) -> None:
    """The base config (or titan's defaults) with the row's keys, as a full TOML."""
    from titan.config import load_config
    from titan.config.manager import to_toml

    cfg = load_config(overrides(toml_tables(req, row.candidate)), config_file=base)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(to_toml(cfg))


def shipped_config(flavor: str) -> str | None:
    """The first titan/train_configs/*.toml (by name) of the flavor; None: titan's defaults."""
    from titan.config import load_config

    for path in sorted((REPO_ROOT / "titan/train_configs").glob("*.toml")):
        if load_config([], config_file=str(path)).model.flavor == flavor:
            return str(path)
    return None


def dry_run(config: Path, folder: Path, gpus: int, memory_gib: float) -> tuple[dict | None, str]:
    """(dry_run.json, or None if the run failed; the log's last line) of a traced step of the
    config on `gpus` ranks, started as run_train.sh starts one (COMM_MODE=fake_backend)."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    path = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env |= {"COMM_MODE": "fake_backend", "NGPU": str(gpus), "WORLD_SIZE": str(gpus),
            "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": str(os.cpu_count() or 1),
            "PYTHONPATH": os.pathsep.join(path)}  # fmt: skip
    cmd = [sys.executable, "-m", "titan.train", "--job.config_file", str(config),
           "--job.dump_folder", str(folder), "--dry_run.memory_gib", str(memory_gib)]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    log = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    result = folder / "dry_run.json"
    found = json.loads(result.read_text()) if result.exists() else None
    return found, f"exit {out.returncode}: {log[-1] if log else 'no output'}"


def verify(req: Request, rows: list[Plan], args: argparse.Namespace) -> Iterator[str]:
    """Trace each row's step (dry run) and set its highest traced peak beside the estimates:
    the planner's (the loss compiled, as the TOML sets it) and the one for what the trace runs
    (the loss eager); a row whose traced peak, with the reserve, exceeds the memory is marked."""
    base = args.base_config or shipped_config(req.flavor)
    root = Path(args.verify_dir or tempfile.mkdtemp(prefix="plan_verify_"))
    yield (
        f"dry runs of the best {len(rows)} rows, merged into {base or 'titan defaults'} "
        f"(traced with the loss eager; GiB per GPU, {req.reserve_gib:g} GiB reserve):"
    )
    yield VERIFY_HEADER
    try:
        yield from (_verify_row(req, rank, row, base, root / f"rank{rank}")
                    for rank, row in enumerate(rows, start=1))  # fmt: skip
    finally:
        if args.verify_dir is None:
            shutil.rmtree(root)


def _verify_row(req: Request, rank: int, row: Plan, base: str | None, folder: Path) -> str:
    """verify's line for one row."""
    write_config(req, row, base, folder / "config.toml")
    start = time.perf_counter()
    found, last = dry_run(folder / "config.toml", folder, req.gpus, req.memory_gib)
    seconds = time.perf_counter() - start
    if found is None:
        return f"{rank:>4} the dry run failed ({last})"
    traced = max(r["total"] for r in found["ranks"]) / GIB
    eager = memory_of(req, row.candidate, compiled_loss=False).total / GIB
    fits = "yes" if traced + req.reserve_gib <= req.memory_gib else "NO: DOES NOT FIT"
    return (f"{rank:>4} {row.memory.total / GIB:>9.3f} {eager:>9.3f} {traced:>9.3f} "
            f"{eager / traced:>12.3f} {seconds:>7.0f}  {fits}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
