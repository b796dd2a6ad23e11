"""Tests for titan.trainer.metrics (FLOPs, peak table, MetricsLogger, TB/W&B) and
titan.trainer.profiling (traces, memory snapshots, config checks)."""

import collections
import glob
import json
import logging
import os
import re
import resource
import struct
import sys
from pathlib import Path

import pytest
import torch
import wandb
from wandb.proto import wandb_internal_pb2

from titan.config.job_config import Metrics, Profiling
from titan.logger import logger
from titan.trainer.metrics import (
    DeviceMemoryMonitor,
    MetricsLogger,
    flops_per_token,
    peak_flops,
)
from titan.trainer.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling

CPU = torch.device("cpu")


def test_flops_per_token_small_example():
    # N = 1000 params, 100 of them in the embedding: 6 * 900 = 5400.
    # Attention: 12 * L2 * H4 * Q8 * T16 = 12 * 1024 = 12288.
    assert flops_per_token(1000, 100, 2, 4, 8, 16) == 5400 + 12288
    # A tied embedding is also the output matmul: nothing is excluded.
    assert flops_per_token(1000, 0, 2, 4, 8, 16) == 6000 + 12288


def test_flops_per_token_llama3_8b():
    n, emb = 8_030_261_248, 128_256 * 4096  # emb = 525,336,576
    # 6 * (8,030,261,248 - 525,336,576) = 6 * 7,504,924,672 = 45,029,548,032
    # 12 * 32 * 32 * 128 * 8192 = 12,884,901,888
    expected = 45_029_548_032 + 12_884_901_888
    assert expected == 6 * (n - emb) + 12 * 32 * 32 * 128 * 8192
    assert flops_per_token(n, emb, 32, 32, 128, 8192) == expected == 57_914_449_920


def test_flops_per_token_rejects_bad_sizes():
    with pytest.raises(ValueError, match="embedding <= total"):
        flops_per_token(10, 20, 1, 1, 1, 1)


@pytest.mark.parametrize(
    "name, bf16, fp8",
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12, 1979e12),
        ("NVIDIA H100 PCIe", 756.5e12, 1513e12),
        ("NVIDIA H100 NVL", 835.5e12, 1670.5e12),
        ("NVIDIA H200", 989.5e12, 1979e12),
        ("NVIDIA H200 NVL", 835.5e12, 1670.5e12),
        ("NVIDIA GH200 480GB", 989.5e12, 1979e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, None),
        ("NVIDIA A100-PCIE-40GB", 312e12, None),
        ("NVIDIA B200", 2.25e15, 4.5e15),
        ("NVIDIA GB200", 2.5e15, 5e15),
    ],
)
def test_peak_flops_known_devices(name, bf16, fp8):
    assert peak_flops(name, "bfloat16") == pytest.approx(bf16)
    got_fp8 = peak_flops(name, "float8")
    assert got_fp8 == (None if fp8 is None else pytest.approx(fp8))


@pytest.mark.parametrize(
    "name, precision",
    [
        ("cpu", "bfloat16"),
        ("NVIDIA GeForce RTX 4090", "bfloat16"),
        ("NVIDIA H100 80GB HBM3", "float32"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bfloat16"),
        ("", "float8"),
    ],
)
def test_peak_flops_unknown_is_none(name, precision):
    assert peak_flops(name, precision) is None


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's ru_maxrss unit")
def test_cpu_memory_monitor():
    monitor = DeviceMemoryMonitor(CPU)
    before = _peak_rss_bytes()
    peak_bytes, pct = monitor.peak()
    # the peak only grows, so the monitor's reading lies between the kernel's before and after
    assert before <= peak_bytes <= _peak_rss_bytes()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert pct == pytest.approx(100 * peak_bytes / total)
    monitor.reset_peak()  # a no-op on CPU, but must not fail
    assert monitor.peak()[0] >= peak_bytes
    assert monitor.stats() == {}


@pytest.fixture
def titan_records(caplog):
    # titan's logger does not propagate to the root logger that caplog listens on.
    old = logger.propagate
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="titan"):
        yield caplog
    logger.propagate = old


def _log_once(metrics_logger: MetricsLogger, step: int = 3) -> dict:
    return metrics_logger.log(
        step, loss=7.1234567, grad_norm=1.5, lr=8e-4, ntokens=4096, elapsed_s=2.0, data_s=0.5
    )


def test_metrics_logger_cpu_values_and_line(tmp_path, titan_records):
    ml = MetricsLogger(
        Metrics(), str(tmp_path), rank=0, device=CPU, flops_per_token=1000, peak_flops=None
    )
    before = ml.memory.peak()[0]
    m = _log_once(ml)
    after = ml.memory.peak()[0]
    ml.close()
    assert m["tokens_per_s"] == 2048.0
    assert m["tflops"] == 2048.0 * 1000 / 1e12
    assert m["mfu_pct"] is None
    assert m["data_pct"] == 25.0
    assert m["loss"] == 7.1234567
    assert before <= m["memory_gib"] * 1024**3 <= after  # the process's peak RSS, in GiB
    lines = [r.getMessage() for r in titan_records.records if "loss:" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert "step: 3" in line
    assert re.search(r"loss: 7\.123457\b", line)  # six decimals, rounded
    assert "mfu: n/a" in line
    assert "tokens/s: 2,048" in line
    assert not os.path.exists(tmp_path / "tb")  # TensorBoard off by default


def test_metrics_logger_mfu_with_known_peak(tmp_path):
    ml = MetricsLogger(
        Metrics(), str(tmp_path), rank=0, device=CPU, flops_per_token=10**9, peak_flops=1e13
    )
    m = ml.log(1, loss=1.0, grad_norm=0.0, lr=1.0, ntokens=100, elapsed_s=1.0, data_s=0.0)
    # 100 tokens/s * 1e9 FLOPs = 1e11 FLOP/s = 1% of 1e13.
    assert m["mfu_pct"] == pytest.approx(1.0)
    assert m["tflops"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="elapsed_s"):
        ml.log(2, loss=1.0, grad_norm=0.0, lr=1.0, ntokens=1, elapsed_s=0.0, data_s=0.0)


def test_metrics_jsonl_holds_every_logged_step_and_validation(tmp_path):
    """Rank 0 appends one JSON object per log call: a resumed run continues the same file."""
    for start in (1, 2):  # the second logger: a run resumed at step 2
        ml = MetricsLogger(
            Metrics(), str(tmp_path), rank=0, device=CPU, flops_per_token=1, peak_flops=None
        )
        ml.log(start, loss=3.0 - start, grad_norm=0.5, lr=1e-3, ntokens=10, elapsed_s=1.0,
               data_s=0.0)  # fmt: skip
        ml.log_validation(start, loss=2.0, n_targets=64, elapsed_s=0.1)
        ml.close()
    other = MetricsLogger(Metrics(), str(tmp_path / "r1"), rank=1, device=CPU, flops_per_token=1,
                          peak_flops=None)  # fmt: skip
    other.log(1, loss=1.0, grad_norm=0.0, lr=1.0, ntokens=1, elapsed_s=1.0, data_s=0.0)
    assert not (tmp_path / "r1").exists()  # rank 0 only
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("validation/loss")) for r in rows] == [
        (1, 2.0, None), (1, None, 2.0), (2, 1.0, None), (2, None, 2.0)
    ]  # fmt: skip
    assert rows[1]["validation/perplexity"] == pytest.approx(7.389056, rel=1e-6)
    assert rows[0]["tokens_per_s"] == 10.0 and "mfu_pct" not in rows[0]  # None is left out


def test_should_log():
    ml = MetricsLogger(
        Metrics(log_freq=5), "unused", rank=0, device=CPU, flops_per_token=1, peak_flops=None
    )
    assert [s for s in range(1, 13) if ml.should_log(s, last_step=12)] == [1, 5, 10, 12]


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = Metrics(enable_tensorboard=True)
    ml = MetricsLogger(
        cfg, str(tmp_path), rank=0, device=CPU, flops_per_token=1, peak_flops=None,
        run_name="8B fsdp, lr 3e-4",
    )  # fmt: skip
    _log_once(ml, step=3)
    ml.log(4, loss=6.5, grad_norm=1.0, lr=1e-3, ntokens=10, elapsed_s=1.0, data_s=0.0)
    ml.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "tflops", "memory_gib"} <= set(tags)
    assert "mfu_pct" not in tags  # unknown values are not written as numbers
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(3, pytest.approx(7.1234567)), (4, pytest.approx(6.5))]
    (text,) = acc.Tensors("run/text_summary")  # job.description names the run
    assert text.tensor_proto.string_val == [b"8B fsdp, lr 3e-4"]


def test_tensorboard_rank_0_only(tmp_path):
    cfg = Metrics(enable_tensorboard=True)
    ml = MetricsLogger(cfg, str(tmp_path), rank=1, device=CPU, flops_per_token=1, peak_flops=None)
    _log_once(ml)
    ml.close()
    assert not os.path.exists(tmp_path / "tb")


def _wandb_records(path: str) -> list[wandb_internal_pb2.Record]:
    """The protobuf records of an offline run's .wandb file.

    The file is a 7-byte header (":W&B", magic, version) then LevelDB's log format: 32 KiB blocks
    of chunks, each a 7-byte header (crc32c, length, type) and data; a record too long for its
    block is split in FIRST, MIDDLE.., LAST chunks; a block's last < 7 bytes are padding.
    """
    data = Path(path).read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    block, pos, records, pieces = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def _wandb_items(items) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_offline(tmp_path, monkeypatch) -> None:
    """W&B in offline mode, writing only under tmp_path (its home, cache and config too)."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_SILENT": "true",
        "HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)


def test_wandb_offline(tmp_path, monkeypatch):
    wandb_offline(tmp_path, monkeypatch)
    dump = tmp_path / "run"
    cfg = Metrics(enable_wandb=True, wandb_project="titan-test")
    config = {"model": {"flavor": "debugmodel"}, "training": {"steps": 4, "seed": 0}}
    ml = MetricsLogger(
        cfg, str(dump), rank=0, device=CPU, flops_per_token=1, peak_flops=None,
        config_dict=config, run_name="8B fsdp, lr 3e-4",
    )  # fmt: skip
    given = {3: (7.1234567, 1.5, 8e-4), 4: (6.5, 0.25, 1e-3)}  # _log_once's, then step 4's
    logged = {3: _log_once(ml, step=3)}
    logged[4] = ml.log(4, loss=6.5, grad_norm=0.25, lr=1e-3, ntokens=10, elapsed_s=1.0, data_s=0.0)
    ml.close()
    # finish() can return before wandb's service process has written the run file: stop the
    # service, which flushes it (the next wandb.init starts a new one)
    wandb.teardown()
    runs = glob.glob(str(dump / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    (path,) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    records = _wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "titan-test"
    assert run.display_name == "8B fsdp, lr 3e-4"  # job.description
    got_config = _wandb_items(run.config.update)
    got_config.pop("_wandb")  # wandb's own bookkeeping
    assert got_config == config
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in history] == [3, 4]
    for h in history:
        # every metric that has a value, exactly as logged; wandb adds _step, _runtime, ...
        row = {k: v for k, v in _wandb_items(h.item).items() if not k.startswith("_")}
        assert row == {k: v for k, v in logged[h.step.num].items() if v is not None}, row
        assert (row["loss"], row["grad_norm"], row["lr"]) == given[h.step.num]


def _matmul_steps(prof, steps: int) -> None:
    x = torch.randn(32, 32)
    for _ in range(steps):
        x = torch.tanh(x @ x)
        prof.step()


def _trace_ops(path: Path) -> collections.Counter:
    """How often each profiler step and matmul/tanh op appears in a Chrome trace."""
    names = [e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]]
    wanted = ("ProfilerStep#", "aten::mm", "aten::tanh")
    return collections.Counter(n for n in names if n.startswith(wanted))


def test_profiling_writes_trace(tmp_path):
    cfg = Profiling(enable_profiling=True, profile_freq=4, profiler_warmup=1, profiler_active=1)
    with maybe_enable_profiling(cfg, str(tmp_path), rank=0) as prof:
        assert prof is not None
        _matmul_steps(prof, 4)
        # The window ending at step 4 is written as soon as step 4 is marked done.
        trace = tmp_path / "profile_traces" / "iteration_4" / "rank0_trace.json"
        assert trace.is_file()
    assert sorted(os.listdir(tmp_path / "profile_traces")) == ["iteration_4"]
    # one active step recorded: the 4th (the profiler counts from 0), one matmul and tanh
    assert _trace_ops(trace) == {"ProfilerStep#3": 1, "aten::mm": 1, "aten::tanh": 1}


def test_profiling_resume_keeps_absolute_steps(tmp_path):
    cfg = Profiling(enable_profiling=True, profile_freq=4, profiler_warmup=1, profiler_active=1)
    with maybe_enable_profiling(cfg, str(tmp_path), rank=2, global_step=6) as prof:
        _matmul_steps(prof, 2)  # steps 7 and 8
    assert os.listdir(tmp_path / "profile_traces") == ["iteration_8"]
    trace = tmp_path / "profile_traces" / "iteration_8" / "rank2_trace.json"
    # the run's second step (step 8) is the one recorded
    assert _trace_ops(trace) == {"ProfilerStep#1": 1, "aten::mm": 1, "aten::tanh": 1}


def test_profiling_disabled_yields_none(tmp_path):
    with maybe_enable_profiling(Profiling(), str(tmp_path), rank=0) as prof:
        assert prof is None
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"profile_freq": 4, "profiler_warmup": 3, "profiler_active": 1}, "must exceed"),
        ({"profile_freq": 0}, "profile_freq must be >= 1"),
        ({"profiler_active": 0}, "profiler_active must be >= 1"),
        ({"profiler_warmup": -1}, "profiler_warmup must be >= 0"),
    ],
)
def test_profiling_bad_config(tmp_path, kwargs, message):
    cfg = Profiling(enable_profiling=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        with maybe_enable_profiling(cfg, str(tmp_path), rank=0):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the non-CUDA path")
def test_memory_snapshot_none_without_cuda(tmp_path, titan_records):
    cfg = Profiling(enable_memory_snapshot=True)
    with maybe_enable_memory_snapshot(cfg, str(tmp_path), rank=0) as snap:
        assert snap is None
    assert any("needs CUDA" in r.getMessage() for r in titan_records.records)
    with maybe_enable_memory_snapshot(Profiling(), str(tmp_path), rank=0) as snap:
        assert snap is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_monitor_and_snapshot(tmp_path):
    device = torch.device("cuda")
    monitor = DeviceMemoryMonitor(device)
    cfg = Profiling(enable_memory_snapshot=True, profile_freq=2)
    with maybe_enable_memory_snapshot(cfg, str(tmp_path), rank=0) as snap:
        for _ in range(2):
            x = torch.empty(256 * 1024**2, dtype=torch.uint8, device=device)  # 256 MiB
            del x
            snap.step()
    path = tmp_path / "memory_snapshot" / "iteration_2" / "rank0_memory_snapshot.pickle"
    assert path.is_file() and path.stat().st_size > 0
    peak_bytes, pct = monitor.peak()
    assert peak_bytes >= 256 * 1024**2 and pct is not None and 0 < pct < 100
    assert monitor.stats()["max_allocated_bytes"] >= 256 * 1024**2
    torch.cuda.empty_cache()  # give the freed block back, so the new window starts lower
    monitor.reset_peak()
    assert monitor.peak()[0] < 256 * 1024**2
