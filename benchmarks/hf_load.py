"""Host memory of loading Hugging Face weights into an FSDP-sharded model, per rank: titan's
shard-by-shard loader (`hf_load.load_hf_weights`) against the full load it replaced (every
rank reads and converts the whole model, casts it to fp32, and `set_model_state_dict` keeps
its shard).

Writes a flavor's random weights as a bf16 HF folder (titan's `save_hf_checkpoint`), unless
`--hf-dir` already holds one; then starts `--ranks` CPU processes (gloo) that each build the
model on the meta device, shard it with titan's `apply_fsdp`, allocate it (`to_empty`, pages
untouched) and load. Each rank reports its resident memory from /proc/self/status: the peak
RSS of the load (VmHWM, reset through /proc/self/clear_refs just before) above the RSS before
it, and the peaks of its two parts, anonymous memory (RssAnon: what the process allocated) and
mapped file pages (RssFile: safetensors' mmapped pages the load touched), sampled every 1 ms.

    python benchmarks/hf_load.py --flavor 1B --ranks 4 --path sharded [--n-layers 2] \
        [--hf-dir /tmp/hf_1b]
"""

import argparse
import ctypes
import dataclasses
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from titan.models.llama3 import FLAVORS, Transformer
from titan.models.llama3.hf_io import INDEX_FILE, save_hf_checkpoint

GiB = 2**30


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    """The largest RssAnon and RssFile seen, sampled every 1 ms until stop()."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = status()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.001):
            now = status()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        return self.peak


def write_folder(args, hf_dir: Path) -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    weights = {k: torch.randn(v.shape, dtype=torch.bfloat16) for k, v in shapes.items()}
    save_hf_checkpoint(weights, args, hf_dir, dtype=torch.bfloat16)


def full_load(model, hf_dir: Path, args) -> None:
    """The loader this benchmark compares against, as load_initial_weights ran it before."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from titan.models.llama3.hf_io import titan_state_dict_from_hf

    state = titan_state_dict_from_hf(hf_dir, args)
    keys = get_model_state_dict(model).keys()
    state = {k: v.to(torch.float32) for k, v in state.items() if k in keys}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def rank_main(rank: int, world: int, port: int, args, hf_dir: Path, path: str, out: Path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="localhost",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from titan.models.llama3.hf_load import load_hf_weights
    from titan.parallelisms.data_parallel import apply_fsdp

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    with torch.device("meta"):
        model = Transformer(args)
    apply_fsdp(model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32,
               reshard_after_forward="default", cpu_offload=False)  # fmt: skip
    model.to_empty(device="cpu")
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert all(isinstance(p, DTensor) for p in model.parameters())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.barrier()
    before = status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if path == "sharded":
        load_hf_weights(model, hf_dir, args)
    else:
        full_load(model, hf_dir, args)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    peak["VmHWM"] = status()["VmHWM"]
    row = (
        f"{rank:4d} {shard / GiB:9.3f} {largest / GiB:10.3f} {(shard + largest) / GiB:8.3f} "
        f"{(peak['VmHWM'] - before['VmRSS']) / GiB:10.3f} "
        f"{(peak['RssAnon'] - before['RssAnon']) / GiB:10.3f} "
        f"{(peak['RssFile'] - before['RssFile']) / GiB:10.3f} {before['VmRSS'] / GiB:8.3f} "
        f"{seconds:6.1f}"
    )
    (out / f"rank{rank}").write_text(row)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="1B", choices=sorted(FLAVORS))
    p.add_argument("--n-layers", type=int, default=None, help="fewer layers of the flavor")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--path", choices=("sharded", "full"), default="sharded")
    p.add_argument("--hf-dir", type=Path, default=None, help="reused if it holds a folder")
    opts = p.parse_args()
    args = FLAVORS[opts.flavor]
    if opts.n_layers is not None:
        args = dataclasses.replace(args, n_layers=opts.n_layers)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = opts.hf_dir or Path(tmp) / "hf"
        if not (hf_dir / INDEX_FILE).is_file():
            write_folder(args, hf_dir)
        size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        print(f"{opts.flavor}, {args.n_layers} layers: {size / GiB:.3f} GiB of bf16 safetensors "
              f"in {hf_dir}; {opts.ranks} ranks, FSDP; {opts.path} load; "
              f"torch {torch.__version__}")  # fmt: skip
        out = Path(tmp)
        port = free_port()
        mp.start_processes(rank_main, args=(opts.ranks, port, args, hf_dir, opts.path, out),
                           nprocs=opts.ranks, start_method="spawn")  # fmt: skip
        print("rank  shard GiB largest GiB  sum GiB  peak RSS+  anon peak+  file peak+  "
              "RSS GiB     s")  # fmt: skip
        for r in range(opts.ranks):
            print((out / f"rank{r}").read_text())


if __name__ == "__main__":
    main()
