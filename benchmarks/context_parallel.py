"""Context parallel on CPU: step time and memory per rank as seq_len grows, at CP 1, 2 and 4,
and how evenly block_causal attention's work splits over the CP ranks on real documents.

Run from the repository root:
  python benchmarks/context_parallel.py [--seq-lens 256,512,1024] [--cps 1,2,4] [--steps 4]

Each (seq_len, cp) trains the debug model (fp32, gloo, one thread per rank) with block_causal
masks on the embedded corpus, one sequence per step, in cp processes; prints the median step
time and rank 0's peak resident memory. Then, for windows of the embedded corpus, the number of
(query, key) pairs each CP rank's queries may attend to under block_causal: the work a
block-sparse kernel (flex attention on GPU) does per rank, max over mean. titan's CPU path
computes the dense masked product, whose work is equal on every rank by construction.
"""

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from titan.components.dataloader import build_dataloader, document_ids  # noqa: E402
from titan.components.tokenizer import build_tokenizer  # noqa: E402
from titan.config import load_config  # noqa: E402
from titan.parallelisms.context_parallel import shard_sequence  # noqa: E402
from titan.train import Trainer  # noqa: E402

DEBUG = str(Path(__file__).resolve().parents[1] / "train_configs" / "debug_model.toml")


def _overrides(seq_len: int, cp: int) -> list[str]:
    return [
        "--job.config_file", DEBUG, "--training.seq_len", str(seq_len),
        "--training.local_batch_size", "1", "--training.device", "cpu",
        "--model.attn_mask_type", "block_causal", "--metrics.log_freq", "1000",
        "--parallelism.context_parallel_degree", str(cp),
        "--parallelism.data_parallel_shard_degree", "1",
    ]  # fmt: skip


def _worker(rank: int, cp: int, port: int, seq_len: int, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cp),
                      MASTER_ADDR="localhost", MASTER_PORT=str(port))  # fmt: skip
    if cp == 1:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key)
    torch.set_num_threads(1)
    trainer = Trainer(load_config(_overrides(seq_len, cp)))
    data = iter(trainer.dataloader)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        batch = next(data)
        start = time.perf_counter()
        trainer.train_step([batch])
        times.append(time.perf_counter() - start)
    if rank == 0:
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        Path(out).write_text(f"{statistics.median(times[1:]):.3f} {rss_gib:.2f}")
    if dist.is_initialized():
        dist.destroy_process_group()


def time_steps(seq_len: int, cp: int, steps: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.start_processes(_worker, args=(cp, port, seq_len, steps, out), nprocs=cp,
                           start_method="spawn")  # fmt: skip
        seconds, rss = Path(out).read_text().split()
    return float(seconds), float(rss)


def work_balance(seq_len: int, cp: int, windows: int = 64) -> tuple[float, float]:
    """(max over mean of the ranks' allowed query-key pairs, over the windows; the mean of that
    ratio) under block_causal, for windows of the embedded corpus."""
    cfg = load_config(_overrides(seq_len, 1))
    tokenizer = build_tokenizer(cfg.model.tokenizer_path)
    loader = iter(build_dataloader(cfg.data, tokenizer, seq_len=seq_len, local_batch_size=1))
    ratios = []
    for _ in range(windows):
        inputs, _ = next(loader)
        docs = document_ids(inputs, tokenizer.bos_id)[0]
        pos = torch.arange(seq_len)
        allowed = (pos[:, None] >= pos[None, :]) & (docs[:, None] == docs[None, :])
        per_rank = [shard_sequence(allowed.sum(1)[None], cp, r).sum().item() for r in range(cp)]
        ratios.append(max(per_rank) / statistics.mean(per_rank))
    return max(ratios), statistics.mean(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="256,512,1024")
    p.add_argument("--cps", default="1,2,4")
    p.add_argument("--steps", type=int, default=4)
    ns = p.parse_args()
    seq_lens = [int(x) for x in ns.seq_lens.split(",")]
    cps = [int(x) for x in ns.cps.split(",")]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; debug model, block_causal, fp32")
    print("seq_len  cp  step s (median)  rank 0 peak RSS GiB")
    for seq_len in seq_lens:
        for cp in cps:
            seconds, rss = time_steps(seq_len, cp, ns.steps)
            print(f"{seq_len:7d} {cp:3d} {seconds:16.3f} {rss:20.2f}")
    print("block_causal work per CP rank (allowed query-key pairs), embedded corpus windows:")
    print("seq_len  cp  worst max/mean  average max/mean")
    for seq_len in (1024, 4096):
        for cp in (2, 4):
            worst, mean = work_balance(seq_len, cp)
            print(f"{seq_len:7d} {cp:3d} {worst:15.3f} {mean:17.3f}")


if __name__ == "__main__":
    main()
