"""Plot titan runs' metrics against the step: one panel per metric, one line per run.

    titan-plot RUN_DIR [RUN_DIR ...] --out curves.png [--labels a,b,...]
        [--metrics loss,validation/loss,tokens_per_s] [--smooth N] [--log-y]

Each RUN_DIR is a run's job.dump_folder (holding metrics.jsonl) or a metrics.jsonl path. A resumed
run appends the steps it re-logs, so for each metric and step the last record in the file wins;
non-finite values (NaN, Infinity) are then left out. --smooth N draws the trailing mean of N
points (validation/* metrics are drawn as logged). Errors print one line and exit with code 2.
"""

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"  # titan.trainer.metrics.METRICS_FILE, without importing torch
DEFAULT_METRICS = ("loss", "validation/loss", "tokens_per_s")
# A series this short (validation every few hundred steps, a single point) gets markers, since a
# line alone would hide isolated points.
_MARKER_MAX_POINTS = 30

Series = tuple[list[int], list[float]]  # (steps, values), steps increasing


class MetricsError(Exception):
    """A run's metrics or the arguments cannot be plotted; the message says how to fix it."""


def agg_canvas() -> type["FigureCanvasAgg"]:
    """matplotlib's file-only canvas, imported here: plotting is the optional extra `plot`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise MetricsError("plotting needs matplotlib: pip install 'titan[plot]'") from None
    return FigureCanvasAgg


def metrics_path(run: str) -> Path:
    """RUN as a directory holding metrics.jsonl, or a metrics.jsonl file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise MetricsError(
            f"no metrics file at {path}: pass a run's job.dump_folder (holding {METRICS_FILE}, "
            "written by rank 0 from its first logged step) or the metrics.jsonl itself"
        )
    return path


def run_name(run: str) -> str:
    """The legend name of RUN: its directory's name (the parent's, for a metrics.jsonl path)."""
    path = Path(run).resolve()
    return path.name if path.is_dir() else path.parent.name


def read_metrics(path: Path, metrics: Sequence[str]) -> dict[str, Series]:
    """The asked metrics of one metrics.jsonl as {metric: (steps, values)}.

    The last record of a (metric, step) wins; a non-finite last record leaves a gap.
    """
    last: dict[str, dict[int, float]] = {m: {} for m in metrics}
    n_records = 0
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            fix = "fix or delete that line"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{where}: not valid JSON ({e.msg}); {fix}") from None
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise MetricsError(f"{where}: not a JSON object with an integer 'step'; {fix}")
            n_records += 1
            for metric in metrics:
                if metric not in record:
                    continue
                value = record[metric]
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise MetricsError(f"{where}: {metric!r} is {value!r}, not a number; {fix}")
                last[metric][step] = float(value)
    if n_records == 0:
        raise MetricsError(
            f"{path} is empty: the run has logged no step yet (it writes every "
            "metrics.log_freq steps); plot it later or leave it out"
        )
    out: dict[str, Series] = {}
    for metric, by_step in last.items():
        points = sorted((s, v) for s, v in by_step.items() if math.isfinite(v))
        out[metric] = ([s for s, _ in points], [v for _, v in points])
    return out


def metric_keys(path: Path) -> set[str]:
    """Every key but 'step' in a readable metrics.jsonl (for the error naming what exists)."""
    keys: set[str] = set()
    with path.open() as f:
        for line in f:
            if line.strip():
                keys.update(json.loads(line))
    return keys - {"step"}


def load_runs(
    runs: Sequence[str], labels: Sequence[str], metrics: Sequence[str]
) -> dict[str, dict[str, Series]]:
    """{metric: {label: (steps, values)}} for the runs; a run without a metric has no entry."""
    paths = [metrics_path(run) for run in runs]
    per_run = {lab: read_metrics(path, metrics) for lab, path in zip(labels, paths, strict=True)}
    merged: dict[str, dict[str, Series]] = {}
    for metric in metrics:
        merged[metric] = {label: s[metric] for label, s in per_run.items() if s[metric][0]}
        if not merged[metric]:
            found = sorted(set().union(*(metric_keys(p) for p in paths)))
            raise MetricsError(
                f"no run has a finite value of metric {metric!r}; the runs log "
                f"{', '.join(found)}: pick --metrics from those"
            )
    return merged


def smooth(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last n points (fewer at the start); n = 1 returns the values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def make_figure(
    series: dict[str, dict[str, Series]], labels: Sequence[str], smooth_n: int, log_y: bool
) -> "Figure":
    """One panel per metric, stacked and sharing the step axis; each run keeps its colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8 * len(series)), layout="constrained")
    agg_canvas()(fig)  # no display: the figure is only written to a file
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, (metric, runs) in zip(axes, series.items(), strict=True):
        # a validation point is already a mean over the whole validation set, and there are few
        n = 1 if metric.startswith("validation/") else smooth_n
        for label, (steps, values) in runs.items():
            marker = "o" if len(steps) <= _MARKER_MAX_POINTS else None
            ys = smooth(values, n)
            ax.plot(steps, ys, label=label, color=colours[label], marker=marker, markersize=3)
        ax.set_title(metric if n == 1 else f"{metric} (mean of {n} points)")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1].set_xlabel("step")
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dump_folder or metrics.jsonl")
    p.add_argument("--out", required=True, help="image to write (.png, .pdf, .svg, ...)")
    p.add_argument("--labels", help="comma-separated legend names, one per run")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated keys")
    p.add_argument(
        "--smooth", type=int, default=1, help="trailing mean over N points (not validation/*)"
    )
    p.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The legend labels and metric names, or MetricsError for an argument that cannot work."""
    if args.labels is None:
        labels = [run_name(run) for run in args.runs]
        twins = sorted({name for name in labels if labels.count(name) > 1})
        if twins:
            raise MetricsError(f"several runs are named {twins[0]!r}: name them with --labels")
    else:
        labels = args.labels.split(",")
        if len(labels) != len(args.runs) or "" in labels or len(set(labels)) != len(labels):
            raise MetricsError(
                f"--labels gives {args.labels!r} for {len(args.runs)} runs: give one distinct, "
                "non-empty label per run, comma-separated"
            )
    metrics = list(dict.fromkeys(args.metrics.split(",")))  # a repeated name: one panel
    if "" in metrics:
        raise MetricsError(f"--metrics {args.metrics!r} has an empty name: e.g. loss,tokens_per_s")
    if args.smooth < 1:
        raise MetricsError(f"--smooth {args.smooth}: give N >= 1 points (1 = no smoothing)")
    suffix = Path(args.out).suffix.lstrip(".").lower()
    if suffix not in agg_canvas().get_supported_filetypes():
        raise MetricsError(f"--out {args.out}: name an image file, e.g. curves.png or curves.pdf")
    return labels, metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        labels, metrics = check_args(args)
        series = load_runs(args.runs, labels, metrics)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig = make_figure(series, labels, args.smooth, args.log_y)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: {', '.join(metrics)} for {', '.join(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
