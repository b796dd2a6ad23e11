"""benchmarks/gpu_check.py on CPU: --smoke writes a JSON and a markdown report with every case's
row, each with a figure or the reason it has none; the budget and the per-case limits stop what
they must; the format check finds a malformed report."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, *args: str, timeout: int = 240) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
           "--work", str(tmp_path / "work"), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert (out / "gpu_check.json").exists(), run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return run.returncode, report, (out / "gpu_check.md").read_text()


def md_rows(markdown: str) -> dict[str, list[str]]:
    """The main table's rows by case name."""
    gpu_check = load_gpu_check()
    head = "| " + " | ".join(gpu_check.report_mod.COLUMNS) + " |"
    lines = markdown.splitlines()
    rows = {}
    for line in lines[lines.index(head) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_smoke_subset_writes_every_row_with_a_value_or_a_reason(tmp_path):
    chosen = "titan_bf16,torchtitan_bf16,generate_1b"
    rc, report, markdown = run_check(tmp_path, "--cases", chosen)
    gpu_check = load_gpu_check()
    assert gpu_check.report_mod.check(report, markdown) == []
    assert rc == 0, markdown
    cases = {c["name"]: c for c in report["cases"]}
    assert list(cases) == gpu_check.cases_mod.ORDER
    rows = md_rows(markdown)
    assert set(rows) == set(cases)
    titan = cases["titan_bf16"]
    assert titan["status"] == "ok" and titan["result"]["tokens_per_s"] > 0
    # the markdown shows the JSON's figure, rounded to whole tokens/s
    assert rows["titan_bf16"][3] == f"{titan['result']['tokens_per_s']:,.0f}"
    # on a CPU the dry run traces the config; there is no max_memory_allocated to compare with
    dry = titan["dry_run"]
    assert dry["status"] == "ok" and dry["estimate_bytes"] > 0 and dry["ratio"] is None
    assert "needs CUDA" in dry["reason"] and "needs CUDA" in rows["titan_bf16"][-1]
    assert sum(dry["parts"].values()) == dry["estimate_bytes"]
    torchtitan = cases["torchtitan_bf16"]
    assert torchtitan["status"] == "skipped" and "torchtitan" in torchtitan["reason"]
    assert rows["torchtitan_bf16"][2] == "skipped" and rows["torchtitan_bf16"][-1]
    gen = cases["generate_1b"]["result"]
    assert [r["batch"] for r in gen["rows"]] == [1, 2]
    assert gen["tokens_per_s"] == gen["rows"][0]["decode_tokens_per_s"] > 0
    for name in ("hf_bf16", "titan_float8_tensorwise", "titan_flex_block_causal"):
        assert cases[name]["status"] == "skipped"
        assert cases[name]["reason"] == "not selected (--cases)" == rows[name][-1]
    comps = {c["name"]: c for c in report["comparisons"]}
    assert comps["titan / HF loop"]["ratio"] is None
    assert comps["titan / HF loop"]["reason"] == "hf_bf16 skipped"
    log = (tmp_path / "out/gpu_check.log").read_text()
    assert "===== titan_bf16 " in log and "===== titan_bf16.dry_run " in log


def test_spent_budget_records_every_case_out_of_time_and_a_failed_install(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    start = time.monotonic()
    rc, report, markdown = run_check(tmp_path, "--budget", "6", "--wheels", str(empty))
    gpu_check = load_gpu_check()
    assert gpu_check.report_mod.check(report, markdown) == []
    assert rc == 0 and time.monotonic() - start < 60
    # pip finds none of wheels.txt's packages in an empty folder, offline
    assert report["environment"]["install"]["status"] == "failed"
    assert "wheels: failed (" in markdown
    for case in report["cases"]:
        assert case["status"] == "out_of_time", case
        assert case["reason"].startswith("not started: ")
        if "dry_run" in case:
            assert case["dry_run"]["status"] == "out_of_time"
    assert all(c["ratio"] is None for c in report["comparisons"])


def test_runner_stops_a_case_at_its_limit_and_reports_a_crash(tmp_path):
    gpu_check = load_gpu_check()
    ns = gpu_check.parse_args(["--out", str(tmp_path), "--work", str(tmp_path / "w")])
    runner = gpu_check.Runner(ns, time.monotonic())
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    done = runner.run("slow", sleep, {}, timeout_s=1, min_s=0)
    assert time.monotonic() - start < 20
    assert done["status"] == "timeout" and "its 1 s limit" in done["reason"]
    crash = [sys.executable, "-c", "raise ValueError('bad spec')"]
    done = runner.run("crash", crash, {}, timeout_s=30, min_s=0)
    assert done["status"] == "failed"
    assert done["reason"].startswith("exit status 1: ValueError: bad spec")
    # a case that writes its result file: the record carries it
    ok = [sys.executable, "-c", "import json, sys; "
          "json.dump({'status': 'ok', 'tokens_per_s': 5.0}, open(sys.argv[2], 'w'))"]  # fmt: skip
    done = runner.run("ok", ok, {}, timeout_s=30, min_s=0)
    assert done["status"] == "ok" and done["result"] == {"tokens_per_s": 5.0}
    assert runner.run("late", ok, {}, timeout_s=30, min_s=1e6)["status"] == "out_of_time"


def _good_report(gpu_check) -> dict:
    cases, plan = [], gpu_check.cases_mod.plan(gpu_check.cases_mod.smoke_shapes("cpu"), True)
    for i, case in enumerate(plan):
        result = {"tokens_per_s": 1000.0 + i, "mfu": None, "max_memory_allocated": None}
        if case.leg == "generate":
            row = {"batch": 1, "prefill_tokens_per_s": 5.0, "decode_tokens_per_s": 1000.0 + i,
                   "decode_ms_per_step": 1.0}  # fmt: skip
            result |= {"rows": [row], "dtype": "float32"}
        cases.append({"name": case.name, "leg": case.leg, "title": case.title, "status": "ok",
                      "reason": "", "seconds": 1.0, "result": result})  # fmt: skip
    env = {"device_name": "cpu", "torch": "x", "install": {"status": "none asked", "reason": ""}}
    return {"schema": gpu_check.report_mod.SCHEMA, "mode": "smoke", "budget_s": 510,
            "elapsed_s": 1, "environment": env, "model": {"description": "tiny"},
            "cases": cases, "comparisons": gpu_check.report_mod.comparisons(cases)}  # fmt: skip


def test_check_finds_what_is_missing_or_inconsistent():
    gpu_check = load_gpu_check()
    rm = gpu_check.report_mod
    good = _good_report(gpu_check)
    markdown = rm.to_markdown(good)
    assert rm.check(good, markdown) == []
    ratio = {c["name"]: c["ratio"] for c in good["comparisons"]}
    assert ratio["float8 rowwise / bf16"] == pytest.approx(1005.0 / 1000.0)

    lines = markdown.splitlines()
    lost_row = "\n".join(line for line in lines if not line.startswith("| hf_bf16 "))
    assert rm.check(good, lost_row) == ["hf_bf16: no row of 9 cells in the markdown table"]

    no_reason = copy.deepcopy(good)
    no_reason["cases"][1] |= {"status": "skipped", "result": None}
    problems = rm.check(no_reason, rm.to_markdown(no_reason))
    assert problems == ["torchtitan_bf16: skipped without a reason",
                        "torchtitan_bf16: skipped without a reason in the markdown"]  # fmt: skip

    no_figure = copy.deepcopy(good)
    del no_figure["cases"][0]["result"]["tokens_per_s"]
    assert "titan_bf16: ok without a tokens/s figure" in rm.check(no_figure, markdown)

    row = "| titan_bf16 | titan, fp32, causal (SDPA) | "
    mismatch = markdown.replace(row + "ok |", row + "failed |")
    assert rm.check(good, mismatch) == ["titan_bf16: the markdown says 'failed', the JSON 'ok'"]

    missing_case = copy.deepcopy(good)
    missing_case["cases"].pop()
    assert rm.check(missing_case, markdown)[0].startswith("cases are [")

    no_comparison = markdown.replace("| flex block_causal / causal |", "| flex |")
    assert rm.check(good, no_comparison) == ["comparison 'flex block_causal / causal' has no row"]


def test_default_layers_fit_the_hf_loop_on_an_h100_and_an_h200():
    cases = load_gpu_check().cases_mod
    mib = 1024**2
    assert cases.default_layers(81_559 * mib) == 5  # H100 80GB HBM3, as torch reports it
    assert cases.default_layers(143_771 * mib) == 14  # H200
    assert cases.default_layers(16 * 1024 * mib) == 1  # never fewer than one block


def test_dry_run_of_a_full_gpu_case_traces_off_the_gpu(tmp_path):
    """The full check dry-runs its CUDA cases with the GPU hidden: 8B shape, 2 blocks, seq 8192."""
    cases = load_gpu_check().cases_mod
    case = cases.plan(cases.full_shapes(2), smoke=False)[0]
    assert case.name == "titan_bf16" and case.spec["device"] == "cuda" and case.spec["compile"]
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps(case.spec | {"dump_folder": str(tmp_path / "dump")}))
    env = dict(os.environ, COMM_MODE="fake_backend", WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")  # fmt: skip
    cmd = [sys.executable, str(ROOT / "benchmarks/gpucheck/worker.py"), "dry_run", spec, result]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    done = json.loads(result.read_text())
    assert done["status"] == "ok" and sum(done["parts"].values()) == done["estimate_bytes"]
    # 8B with 2 blocks: fp32 weights and AdamW moments alone are 16 bytes x 1.49 B parameters
    assert done["estimate_bytes"] > 16 * (2 * 218_112_000 + 2 * 128_256 * 4096)


@pytest.mark.heavy
def test_full_smoke_runs_every_case(tmp_path):
    rc, report, markdown = run_check(tmp_path, timeout=600)
    gpu_check = load_gpu_check()
    assert gpu_check.report_mod.check(report, markdown) == []
    assert rc == 0, markdown
    status = {c["name"]: c["status"] for c in report["cases"]}
    # torchtitan 0.3.0 trains on an accelerator only (or is not installed here)
    assert status.pop("torchtitan_bf16") == "skipped"
    assert set(status.values()) == {"ok"}, status
    ratios = {c["name"]: c["ratio"] for c in report["comparisons"]}
    assert ratios.pop("titan / torchtitan 0.3.0") is None
    assert all(r > 0 for r in ratios.values()), ratios
    for case in report["cases"]:
        if "dry_run" in case:
            assert case["dry_run"]["status"] == "ok" and case["dry_run"]["estimate_bytes"] > 0
