"""The GPU check: one command on one H100/H200 that measures titan against torchtitan 0.3.0 and a
plain Hugging Face loop, float8 against bf16, flex block_causal against causal, titan's dry-run
memory estimates against the real steps, and 1B generation, within a time budget.

    python benchmarks/gpu_check.py --out DIR [--wheels benchmarks/wheels] [--budget 510]
        [--layers N] [--cases titan_bf16,hf_bf16,...] [--smoke]

Writes DIR/gpu_check.json, DIR/gpu_check.md and DIR/gpu_check.log (the end of each case's
output). Each case runs in its own process with its own time limit (benchmarks/gpucheck/:
cases.py says what each measures); titan's dry runs of the titan cases run beside them on the
CPU. A case the budget has no time left for is recorded as out_of_time, never overrun. --wheels
installs the packages the device lacks (benchmarks/gpucheck/wheels-*.txt) with pip, offline,
into a folder the cases import from. --smoke: tiny shapes, eager, on the CPU when there is no GPU
(what CUDA alone can run is recorded as skipped, with the reason). Exit status: 0, or 1 when a
case failed or timed out (the report says which), 2 without a GPU (and without --smoke) or
when the report came out malformed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the gpucheck package beside this script

from gpucheck import cases as cases_mod  # noqa: E402
from gpucheck import report as report_mod  # noqa: E402

RESERVE_S = 5  # kept back from the budget to write the report
DRY_RUN_TIMEOUT_S = 150
LOG_TAIL_LINES = 60
PROBE = """import json, sys, torch
cuda = torch.cuda.is_available()
p = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0], "cuda": cuda,
    "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
    "memory_bytes": p.total_memory if cuda else None,
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None}))"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, .md and .log")
    p.add_argument("--wheels", help="folder of wheels to install first (offline)")
    p.add_argument("--site", default="/tmp/gpu_check_site", help="where the wheels go")
    p.add_argument("--work", default="/tmp/gpu_check_work", help="specs, logs, dump folders")
    p.add_argument("--budget", type=float, default=510.0, help="seconds for the whole check")
    p.add_argument("--layers", type=int, help="blocks of the 8B shape (default: what fits)")
    p.add_argument("--cases", help="comma-separated case names to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, eager; runs on a CPU")
    ns = p.parse_args(argv)
    unknown = set(ns.cases.split(",")) - set(cases_mod.ORDER) if ns.cases else set()
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; the cases are {', '.join(cases_mod.ORDER)}")
    return ns


class Runner:
    """Starts case processes within the budget and turns what they leave into records."""

    def __init__(self, ns: argparse.Namespace, start: float) -> None:
        self.deadline = start + ns.budget - RESERVE_S
        self.work = Path(ns.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.work / "inductor"))
        self.logs: list[tuple[str, Path]] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.procs: dict[str, subprocess.Popen] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, tag: str, cmd: list[str], spec: dict, timeout_s: float, min_s: float,
            env: dict | None = None) -> dict:  # fmt: skip
        """Run one process; a record {status, reason, seconds, result}."""
        left = self.left()
        if self.stopping or left < min_s:
            why = f"not started: {max(left, 0):.0f} s of the budget left, it needs {min_s:.0f} s"
            return {"status": "out_of_time", "reason": why, "seconds": 0.0, "result": None}
        limit = min(timeout_s, left)
        spec_path, result_path = self.work / f"{tag}.spec.json", self.work / f"{tag}.result.json"
        log_path = self.work / f"{tag}.log"
        spec = dict(spec, dump_folder=str(self.work / tag))
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        with self.lock:
            self.logs.append((tag, log_path))
        started = time.monotonic()
        with open(log_path, "w") as log:
            # a session of its own, so a timeout ends its compile workers with it
            proc = subprocess.Popen([*cmd, str(spec_path), str(result_path)], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                    start_new_session=True)  # fmt: skip
            self.procs[tag] = proc
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            finally:
                self.procs.pop(tag, None)
        seconds = time.monotonic() - started
        if rc is None or (self.stopping and rc != 0):
            status = "timeout" if limit == timeout_s and not self.stopping else "out_of_time"
            why = f"its {timeout_s:.0f} s limit" if status == "timeout" else "the budget's end"
            return {"status": status, "reason": f"stopped at {why} after {seconds:.0f} s",
                    "seconds": seconds, "result": None}  # fmt: skip
        if rc != 0 or not result_path.exists():
            why = f"exit status {rc}: {last_error(log_path)} (log: {log_path})"
            return {"status": "failed", "reason": why, "seconds": seconds, "result": None}
        result = json.loads(result_path.read_text())
        status = result.pop("status")
        return {"status": status, "reason": result.pop("reason", ""), "seconds": seconds,
                "result": result if status == "ok" else None}  # fmt: skip

    def stop(self) -> None:
        """The budget is spent: end what still runs (the dry runs) and start nothing more."""
        self.stopping = True
        for proc in list(self.procs.values()):
            os.killpg(proc.pid, signal.SIGKILL)


def last_error(log_path: Path) -> str:
    """The exception line of a log's last traceback, else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:400]


def install_wheels(ns: argparse.Namespace) -> dict:
    """pip install, offline, from the folder ns.wheels into ns.site: titan's wheels, then
    torchtitan's (gpucheck/wheels-*.txt), each set apart so that one failing spares the other."""
    if not ns.wheels:
        return {"status": "none asked", "reason": "", "seconds": 0.0}
    start, failed = time.monotonic(), {}
    for group in ("titan", "torchtitan"):
        reqs = str(HERE / "gpucheck" / f"wheels-{group}.txt")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        cmd = [*pip, "--find-links", ns.wheels, "--upgrade", "--target", ns.site, "-r", reqs]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            tail = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
            failed[group] = (tail or ["no output"])[-1][:300]
    status = "failed" if "titan" in failed else "partly installed" if failed else "installed"
    reason = "; ".join(f"{group}'s wheels: {why}" for group, why in failed.items())
    return {"status": status, "reason": reason, "seconds": time.monotonic() - start,
            "site": ns.site}  # fmt: skip


def probe(env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"gpu_check: torch does not start here: {run.stderr.strip()[-300:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def leg_command(leg: str) -> list[str]:
    if leg == "torchtitan":
        return [sys.executable, str(HERE / "gpucheck" / "torchtitan_leg.py")]
    return [sys.executable, str(HERE / "gpucheck" / "worker.py"), leg]


def dry_runs(runner: Runner, todo: list[cases_mod.Case], out: dict[str, dict]) -> None:
    """titan's dry run of each case's config, one after another, off the GPU."""
    env = dict(runner.env, COMM_MODE="fake_backend", WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="")
    for case in todo:
        tag = f"{case.name}.dry_run"
        out[case.name] = runner.run(tag, leg_command("dry_run"), case.spec, DRY_RUN_TIMEOUT_S,
                                    min_s=5, env=env)  # fmt: skip


def dry_run_record(done: dict | None, case: dict) -> dict:
    """A titan case's dry-run estimate beside its real step's max_memory_allocated."""
    if done is None:
        return {"status": "out_of_time", "reason": "not reached before the budget's end"}
    if done["status"] != "ok":
        return {"status": done["status"], "reason": done["reason"]}
    measured = (case.get("result") or {}).get("max_memory_allocated")
    record = {"status": "ok", "reason": "", "seconds": done["seconds"],
              "estimate_bytes": done["result"]["estimate_bytes"], "parts": done["result"]["parts"],
              "measured_bytes": measured, "ratio": None}  # fmt: skip
    if measured:
        record["ratio"] = record["estimate_bytes"] / measured
    elif case["status"] != "ok":
        record["reason"] = f"nothing to compare with: the case is {case['status']}"
    else:
        record["reason"] = "traced only: max_memory_allocated needs CUDA (fp32 CPU step here)"
    return record


def write_log(runner: Runner, path: Path) -> None:
    with open(path, "w") as out:
        for tag, log_path in runner.logs:
            lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
            out.write(f"===== {tag} ({len(lines)} lines, last {LOG_TAIL_LINES}; {log_path})\n")
            out.writelines(line + "\n" for line in lines[-LOG_TAIL_LINES:])


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    started, start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    runner = Runner(ns, start)
    install = install_wheels(ns)
    if install["status"] != "none asked" and Path(ns.site).is_dir():
        paths = [ns.site, runner.env.get("PYTHONPATH", "")]
        runner.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env = probe(runner.env) | {"install": install}
    if not (ns.smoke or env["cuda"]):
        print("gpu_check: no CUDA device here; the full check needs one H100/H200 (--smoke "
              "runs on a CPU)", file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if env["cuda"] else "cpu"
    if ns.smoke:
        shapes = cases_mod.smoke_shapes(device)
    else:
        shapes = cases_mod.full_shapes(ns.layers or cases_mod.default_layers(env["memory_bytes"]))
    plan = cases_mod.plan(shapes, ns.smoke)
    chosen = set(ns.cases.split(",")) if ns.cases else set(cases_mod.ORDER)
    dry: dict[str, dict] = {}
    traced = [c for c in plan if c.dry_run and c.name in chosen]
    thread = threading.Thread(target=dry_runs, args=(runner, traced, dry), daemon=True)
    thread.start()
    records = []
    for case in plan:
        if case.name in chosen:
            done = runner.run(case.name, leg_command(case.leg), case.spec, case.timeout_s,
                              case.min_s)  # fmt: skip
        else:
            done = {"status": "skipped", "reason": "not selected (--cases)", "seconds": 0.0,
                    "result": None}  # fmt: skip
        records.append({"name": case.name, "leg": case.leg, "title": case.title} | done)
        print(f"gpu_check: {case.name}: {done['status']} in {done['seconds']:.0f} s "
              f"{done['reason']}", flush=True)  # fmt: skip
    thread.join(timeout=max(0.0, runner.left()))
    if thread.is_alive():
        runner.stop()
        thread.join()
    for case, record in zip(plan, records, strict=True):
        if case.dry_run and case.name in chosen:
            record["dry_run"] = dry_run_record(dry.get(case.name), record)
        elif case.dry_run:
            record["dry_run"] = {"status": "skipped", "reason": "not selected (--cases)"}
    report = {
        "schema": report_mod.SCHEMA, "mode": "smoke" if ns.smoke else "full",
        "started": started, "budget_s": ns.budget, "elapsed_s": time.monotonic() - start,
        "environment": env,
        "model": cases_mod.as_dict(shapes) | {"description": cases_mod.describe(shapes)},
        "cases": records, "comparisons": report_mod.comparisons(records),
    }  # fmt: skip
    markdown = report_mod.to_markdown(report)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown)
    write_log(runner, out / "gpu_check.log")
    print(markdown)
    problems = report_mod.check(report, markdown)
    for problem in problems:
        print(f"gpu_check: malformed report: {problem}", file=sys.stderr)
    if problems:
        return 2
    return 1 if any(r["status"] in ("failed", "timeout") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
