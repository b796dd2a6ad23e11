"""The GPU check's report: gpu_check.json (every figure, in bytes and per second) and
gpu_check.md (the tables), and `check`, which says what is wrong with a pair of them: a case
without its row, a row without a value or a reason, a markdown table that disagrees with the JSON.
"""

import math

from .cases import COMPARISONS, ORDER, STATUSES

SCHEMA = "titan-gpu-check/1"
GIB = 1024**3
COLUMNS = ["case", "what", "status", "tokens/s", "MFU", "max_memory_allocated GiB",
           "dry-run estimate GiB", "estimate / measured", "note"]  # fmt: skip


def comparisons(cases: list[dict]) -> list[dict]:
    """Each comparison's tokens/s ratio, or why there is none."""
    by_name = {c["name"]: c for c in cases}
    out = []
    for comp in COMPARISONS:
        row = {"name": comp.name, "numerator": comp.numerator, "denominator": comp.denominator,
               "ratio": None, "reason": ""}  # fmt: skip
        missing = [by_name[n] for n in (comp.numerator, comp.denominator)
                   if by_name[n]["status"] != "ok"]  # fmt: skip
        if missing:
            row["reason"] = "; ".join(f"{c['name']} {c['status']}" for c in missing)
        else:
            num, den = (
                by_name[n]["result"]["tokens_per_s"] for n in (comp.numerator, comp.denominator)
            )
            row["ratio"] = num / den
        out.append(row)
    return out


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _row(case: dict) -> list[str]:
    r = case.get("result") or {}
    ok = case["status"] == "ok"
    dry = case.get("dry_run") or {}
    mem = r.get("max_memory_allocated")
    if case["leg"] == "hf" and r.get("loop_memory") is not None and mem is not None:
        mem = r["loop_memory"]  # the process also held titan's weights: the loop's own
    notes = [] if ok else [case["reason"]]
    if dry and ok and dry["status"] != "ok":  # a case that did not run says why itself
        notes.append(f"dry run {dry['status']}: {dry['reason']}")
    elif dry and ok and dry.get("ratio") is None:
        notes.append(f"dry run: {dry['reason']}")
    if ok and r.get("mfu") is not None and r.get("mfu_peak", "bf16 peak") != "bf16 peak":
        notes.append(f"MFU against the {r['mfu_peak']}")
    return [
        case["name"], case["title"], case["status"],
        _num(r.get("tokens_per_s"), ",.0f") if ok else "",
        _num(100 * r["mfu"], ".1f") + " %" if ok and r.get("mfu") is not None else "",
        _num(mem / GIB, ".2f") if ok and mem is not None else "",
        _num(dry["estimate_bytes"] / GIB, ".2f") if dry.get("estimate_bytes") else "",
        _num(dry.get("ratio"), ".2f") if dry.get("ratio") is not None else "",
        "; ".join(notes).replace("|", "/").replace("\n", " "),
    ]  # fmt: skip


def to_markdown(report: dict) -> str:
    env, model = report["environment"], report["model"]
    lines = [
        "# GPU check: titan against torchtitan 0.3.0 and a Hugging Face loop",
        "",
        f"- mode: {report['mode']}; device: {env['device_name']}; torch {env['torch']}; "
        f"budget {report['budget_s']:.0f} s, took {report['elapsed_s']:.0f} s",
        f"- model: {model['description']}",
        f"- wheels: {env['install']['status']}"
        + (f" ({env['install']['reason']})" if env["install"]["reason"] else ""),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row(c)) + " |" for c in report["cases"]]
    lines += ["", "| comparison (tokens/s) | ratio | note |", "|---|---|---|"]
    for comp in report["comparisons"]:
        ratio = _num(comp["ratio"], ".2f")
        lines.append(f"| {comp['name']} | {ratio} | {comp['reason'].replace('|', '/')} |")
    gen = next(c for c in report["cases"] if c["name"] == "generate_1b")
    if gen["status"] == "ok":
        lines += ["", f"Generation ({gen['title']}, {gen['result']['dtype']}):", "",
                  "| batch | prefill tokens/s | decode tokens/s | decode ms/step |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in gen["result"]["rows"]:
            cells = [
                f"{r['batch']}",
                f"{r['prefill_tokens_per_s']:,.0f}",
                f"{r['decode_tokens_per_s']:,.0f}",
                f"{r['decode_ms_per_step']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(markdown: str, header: list[str]) -> list[list[str]]:
    """The rows of the markdown table whose header row is `header`."""
    lines = markdown.splitlines()
    head = "| " + " | ".join(header) + " |"
    if head not in lines:
        return []
    rows = []
    for line in lines[lines.index(head) + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").removesuffix(" %"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check(report: dict, markdown: str) -> list[str]:
    """What is wrong with the report: [] when every case has its row with a value or a reason."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, not {SCHEMA!r}")
    names = [c.get("name") for c in report.get("cases", [])]
    if names != ORDER:
        problems.append(f"cases are {names}, not {ORDER}")
    rows = {row[0]: row for row in _table(markdown, COLUMNS)}
    for case in report.get("cases", []):
        name, status = case.get("name"), case.get("status")
        if status not in STATUSES:
            problems.append(f"{name}: status {status!r} is not one of {STATUSES}")
        result = case.get("result") or {}
        if status == "ok" and _number(str(result.get("tokens_per_s"))) is None:
            problems.append(f"{name}: ok without a tokens/s figure")
        if status != "ok" and not case.get("reason"):
            problems.append(f"{name}: {status} without a reason")
        row = rows.get(name)
        if row is None or len(row) != len(COLUMNS):
            problems.append(f"{name}: no row of {len(COLUMNS)} cells in the markdown table")
            continue
        if row[2] != status:
            problems.append(f"{name}: the markdown says {row[2]!r}, the JSON {status!r}")
        if status == "ok" and _number(row[3]) is None:
            problems.append(f"{name}: ok without tokens/s in the markdown ({row[3]!r})")
        if status != "ok" and not row[-1]:
            problems.append(f"{name}: {status} without a reason in the markdown")
        dry = case.get("dry_run")
        if dry is not None and dry.get("status") == "ok" and not dry.get("estimate_bytes"):
            problems.append(f"{name}: a dry run without its estimate")
    comps = {row[0] for row in _table(markdown, ["comparison (tokens/s)", "ratio", "note"])}
    problems += [f"comparison {c.name!r} has no row" for c in COMPARISONS if c.name not in comps]
    return problems
