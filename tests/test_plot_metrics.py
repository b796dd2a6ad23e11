"""titan-plot (titan/cli/plot.py): merging resumed runs' metrics.jsonl, the drawn lines, and its
errors."""

import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from titan.cli import plot as pm


def train(step: int, loss: float, tps: float = 1000.0) -> dict:
    """A training record with MetricsLogger's keys."""
    return {
        "step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-4, "tokens_per_s": tps,
        "tflops": 1.0, "memory_gib": 2.0, "data_pct": 0.5,
    }  # fmt: skip


def val(step: int, loss: float) -> dict:
    return {"step": step, "validation/loss": loss, "validation/perplexity": math.exp(loss)}


def write_run(path: Path, records: list[dict]) -> Path:
    """A run folder holding metrics.jsonl, written as MetricsLogger._write does (json.dumps)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(lines)
    return path


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures main() draws, in order (main itself only returns an exit code)."""
    drawn = []
    real = pm.make_figure

    def record(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(pm, "make_figure", record)
    return drawn


def test_resumed_run_keeps_last_record_per_step(tmp_path: Path) -> None:
    # Logged steps 1-4, killed, resumed from the step-2 checkpoint: steps 3 and 4 are re-logged
    # with new values, then 5 follows.
    records = [train(1, 9.0), train(2, 8.0), train(3, 7.5), train(4, 7.4)]
    records += [train(3, 7.0, tps=300.0), train(4, 6.0), train(5, 5.0)]
    path = write_run(tmp_path / "run", records) / "metrics.jsonl"
    got = pm.read_metrics(path, ["loss", "tokens_per_s"])
    assert got["loss"] == ([1, 2, 3, 4, 5], [9.0, 8.0, 7.0, 6.0, 5.0])
    assert got["tokens_per_s"] == ([1, 2, 3, 4, 5], [1000.0, 1000.0, 300.0, 1000.0, 1000.0])


def test_validation_points_are_their_own_series(tmp_path: Path) -> None:
    records = [train(1, 9.0), train(2, 8.0), val(2, 8.5), train(3, 7.0), val(3, 7.7)]
    records.append({"step": 4, "loss": 6.0, "some_future_key": "text"})  # unknown keys ignored
    write_run(tmp_path / "run", records)
    got = pm.load_runs([str(tmp_path / "run")], ["run"], ["loss", "validation/loss"])
    assert got["loss"] == {"run": ([1, 2, 3, 4], [9.0, 8.0, 7.0, 6.0])}
    assert got["validation/loss"] == {"run": ([2, 3], [8.5, 7.7])}


def test_non_finite_values_are_skipped(tmp_path: Path) -> None:
    records = [train(1, 9.0), train(2, math.nan), train(3, math.inf), train(4, -math.inf)]
    records += [train(5, 5.0), train(6, 4.0), train(6, math.nan)]  # a NaN last record: a gap
    path = write_run(tmp_path / "run", records) / "metrics.jsonl"
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()
    assert pm.read_metrics(path, ["loss"])["loss"] == ([1, 5], [9.0, 5.0])


def test_smooth_is_a_trailing_mean() -> None:
    assert pm.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert pm.smooth([1.0, 3.0, 5.0, 7.0], 3) == [1.0, 2.0, 3.0, 5.0]
    assert pm.smooth([1.0, 3.0], 1) == [1.0, 3.0]


def test_two_runs_draw_two_lines_per_panel(tmp_path: Path, figures: list, capsys) -> None:
    a = write_run(tmp_path / "fsdp", [train(1, 9.0, 100.0), train(2, 8.0, 110.0), val(2, 8.4)])
    b = write_run(tmp_path / "tp", [train(1, 9.5, 200.0), train(2, 7.0, 210.0), val(2, 7.9)])
    out = tmp_path / "plots" / "curves.png"
    # one run passed as its metrics.jsonl: named after its folder
    assert pm.main([str(a), str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "validation/loss", "tokens_per_s"]
    expected = {
        "loss": {"fsdp": [9.0, 8.0], "tp": [9.5, 7.0]},
        "validation/loss": {"fsdp": [8.4], "tp": [7.9]},
        "tokens_per_s": {"fsdp": [100.0, 110.0], "tp": [200.0, 210.0]},
    }
    for ax in axes:
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert lines == expected[ax.get_title()]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fsdp", "tp"]
        # each run keeps its colour across panels
        assert [line.get_color() for line in ax.get_lines()] == ["C0", "C1"]
    assert list(axes[1].get_lines()[0].get_xdata()) == [2]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = figures[0].get_size_inches() * 120
    assert imread(out).shape[:2] == (round(height), round(width))


def test_labels_smooth_and_log_y(tmp_path: Path, figures: list) -> None:
    a = write_run(tmp_path / "a", [train(s, 10.0 - s) for s in range(1, 5)] + [val(4, 3.0)])
    b = write_run(
        tmp_path / "b", [train(s, 20.0 - s) for s in range(1, 5)] + [val(2, 5.0), val(4, 1.0)]
    )
    argv = [str(a), str(b), "--out", str(tmp_path / "c.png"), "--labels", "base,resumed"]
    assert pm.main([*argv, "--metrics", "loss,validation/loss", "--smooth", "2", "--log-y"]) == 0
    loss, validation = figures[0].axes
    lines = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
    assert lines == {"base": [9.0, 8.5, 7.5, 6.5], "resumed": [19.0, 18.5, 17.5, 16.5]}
    assert loss.get_title() == "loss (mean of 2 points)"
    # validation points are drawn as logged
    lines = {line.get_label(): list(line.get_ydata()) for line in validation.get_lines()}
    assert lines == {"base": [3.0], "resumed": [5.0, 1.0]}
    assert validation.get_title() == "validation/loss"
    assert loss.get_yscale() == validation.get_yscale() == "log"


def _error(capsys, argv: list[str]) -> str:
    assert pm.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_errors(tmp_path: Path, capsys) -> None:
    good = write_run(tmp_path / "good", [train(1, 9.0), val(1, 9.1)])
    out = ["--out", str(tmp_path / "c.png")]
    missing = tmp_path / "nothing"
    missing.mkdir()
    err = _error(capsys, [str(good), str(missing), *out])
    assert f"no metrics file at {missing / 'metrics.jsonl'}" in err and "dump_folder" in err
    write_run(tmp_path / "empty", [])
    err = _error(capsys, [str(tmp_path / "empty"), *out])
    assert "metrics.jsonl is empty" in err and "leave it out" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps(train(1, 9.0)) + '\n{"step": 2, "loss": 8\n')
    err = _error(capsys, [str(bad), *out])
    assert f"{bad / 'metrics.jsonl'}, line 2: not valid JSON" in err and "fix or delete" in err
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n\n["loss", 8]\n')
    assert "line 3: not a JSON object with an integer 'step'" in _error(capsys, [str(bad), *out])
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": "high"}\n')
    assert "line 1: 'loss' is 'high', not a number" in _error(capsys, [str(bad), *out])
    err = _error(capsys, [str(good), *out, "--metrics", "loss,mfu_pct"])
    assert "no run has a finite value of metric 'mfu_pct'" in err
    assert "data_pct, grad_norm" in err and "validation/perplexity" in err
    err = _error(capsys, [str(good), str(good), *out, "--labels", "a"])
    assert "--labels gives 'a' for 2 runs" in err
    twin = write_run(tmp_path / "x" / "good", [train(1, 9.0)])
    assert "several runs are named 'good'" in _error(capsys, [str(good), str(twin), *out])
    assert "empty name" in _error(capsys, [str(good), *out, "--metrics", "loss,"])
    assert "--smooth 0: give N >= 1" in _error(capsys, [str(good), *out, "--smooth", "0"])
    err = _error(capsys, [str(good), "--out", str(tmp_path / "curves.txt")])
    assert "name an image file" in err
    assert not (tmp_path / "c.png").exists()  # no error wrote a figure
