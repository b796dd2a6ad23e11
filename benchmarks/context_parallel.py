"""Context parallel on CPU: step time and memory per rank as seq_len grows, at CP 1, 2 and 4,
and how evenly block_causal attention's work splits over the CP ranks on real documents.

Run from the repository root:
  python benchmarks/context_parallel.py [--seq-lens 256,512,1024] [--cps 1,2,4] [--steps 4]
      [--balance-seq-lens 1024,4096,16384]      # --steps 0: the work balance alone

Each (seq_len, cp) trains the debug model (fp32, gloo, one thread per rank) with block_causal
masks on the embedded corpus, one sequence per step, in cp processes; prints the median step
time and rank 0's peak resident memory. Then, for windows of the embedded corpus under
block_causal, each CP rank's work, max over mean: the (query, key) pairs its queries may attend
to, and the 128 x 128 blocks holding any such pair (what flex attention computes on GPU), with
head-tail chunks and with titan's document-balanced ones. titan's CPU path computes the dense
masked product, whose work is equal on every rank by construction.
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

from titan.config import load_config  # noqa: E402
from titan.data.dataloader import build_dataloader, document_ids  # noqa: E402
from titan.data.tokenizer import build_tokenizer  # noqa: E402
from titan.parallelisms.context_parallel import chunk_order, document_chunks  # noqa: E402
from titan.trainer.trainer import Trainer  # noqa: E402

DEBUG = str(Path(__file__).resolve().parents[1] / "titan/train_configs" / "debug_model.toml")


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


def _rank_work(allowed: torch.Tensor, chunks: list[list[int]], block: int) -> list[list[int]]:
    """Per rank: [allowed (query, key) pairs of its queries, flex blocks with any allowed pair]
    for the ranks' chunks; keys are gathered in rank order, as attention sees them."""
    n = sum(len(c) for c in chunks)
    order = torch.cat([torch.arange(allowed.shape[0]).chunk(n)[i] for cs in chunks for i in cs])
    allowed = allowed[order][:, order]  # rows: queries in rank order; columns: gathered keys
    work = []
    for rows in allowed.chunk(len(chunks)):
        blocks = rows.unflatten(0, (-1, block)).unflatten(2, (-1, block)).any(1).any(-1)
        work.append([int(rows.sum()), int(blocks.sum())])
    return work


def work_balance(seq_len: int, cp: int, windows: int = 32, block: int = 128) -> dict[str, list]:
    """Under block_causal, for windows of the embedded corpus: max over mean of the ranks'
    allowed (query, key) pairs and of their flex blocks (block x block tiles with any allowed
    pair), with head-tail chunks and with titan's document-balanced chunks; [worst, average]."""
    cfg = load_config(_overrides(seq_len, 1))
    tokenizer = build_tokenizer(cfg.model.tokenizer_path)
    loader = iter(build_dataloader(cfg.data, tokenizer, seq_len=seq_len, local_batch_size=1))
    head_tail = [chunk_order(cp, r) for r in range(cp)]
    ratios = {
        f"{how} {what}": [] for how in ("head-tail", "balanced") for what in ("pairs", "blocks")
    }
    for _ in range(windows):
        inputs, _ = next(loader)
        docs = document_ids(inputs, tokenizer.bos_id)
        pos = torch.arange(seq_len)
        allowed = (pos[:, None] >= pos[None, :]) & (docs[0, :, None] == docs[0, None, :])
        for how, chunks in (("head-tail", head_tail), ("balanced", document_chunks(docs, cp))):
            work = _rank_work(allowed, chunks, block)
            for i, what in enumerate(("pairs", "blocks")):
                per_rank = [w[i] for w in work]
                ratios[f"{how} {what}"].append(max(per_rank) / statistics.mean(per_rank))
    return {k: [max(v), statistics.mean(v)] for k, v in ratios.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="256,512,1024")
    p.add_argument("--cps", default="1,2,4")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--balance-seq-lens", default="1024,4096,16384",
                   type=lambda v: [int(x) for x in v.split(",")])  # fmt: skip
    ns = p.parse_args()
    seq_lens = [int(x) for x in ns.seq_lens.split(",")]
    cps = [int(x) for x in ns.cps.split(",")]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; debug model, block_causal, fp32")
    print("seq_len  cp  step s (median)  rank 0 peak RSS GiB")
    for seq_len in seq_lens if ns.steps else []:
        for cp in cps:
            seconds, rss = time_steps(seq_len, cp, ns.steps)
            print(f"{seq_len:7d} {cp:3d} {seconds:16.3f} {rss:20.2f}")
    print("block_causal work per CP rank, max over mean (worst window / average), 32 windows of")
    print("the embedded corpus: allowed query-key pairs, and flex's 128 x 128 blocks")
    for seq_len in ns.balance_seq_lens:
        for cp in (2, 4):
            cells = "  ".join(
                f"{k} {w:.3f}/{a:.3f}" for k, (w, a) in work_balance(seq_len, cp).items()
            )
            print(f"{seq_len:7d} {cp:3d}  {cells}")


if __name__ == "__main__":
    main()
