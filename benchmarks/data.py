"""Data loading speed: tokens/s of each way titan reads text, against what a training step
consumes, and titan-preprocess's tokens/s per worker.

Run from the repository root:
  python benchmarks/data.py [--copies 4] [--seq-len 2048] [--batch 8] [--batches 50]

The documents are the embedded corpus written `copies` times to a jsonl file. Loaders, for
(batch, seq_len) batches: "streamed" tokenizes each document as a window needs it (how a hub
stream is read, one dp rank); "tokenized at start-up" reads windows from documents tokenized
when the loader is built (local files, the embedded corpus; the build time is printed apart);
"preprocessed" reads windows from the memory-mapped files of titan-preprocess. Then
titan-preprocess over the same file with 1 and 2 workers (printed as preprocess_data.py, its
name when the figures in benchmarks/README.md were recorded).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from titan.cli import preprocess  # noqa: E402
from titan.config.job_config import Data  # noqa: E402
from titan.data.dataloader import build_dataloader, load_embedded_corpus  # noqa: E402
from titan.data.streaming import PackedTextDataset, _StreamSource  # noqa: E402
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer  # noqa: E402


def rate(batches, n: int, tokens_per_batch: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=50)
    ns = p.parse_args()
    tok = build_tokenizer(SHIPPED_TOKENIZER)
    per_batch = ns.batch * ns.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf"
        docs = Path(tmp) / "docs.jsonl"
        with open(docs, "w") as f:
            for _ in range(ns.copies):
                f.writelines(json.dumps({"text": t}) + "\n" for t in load_embedded_corpus())
        print(f"{os.cpu_count()} CPUs; {docs.stat().st_size / 2**20:.1f} MiB of jsonl, "
              f"batches of {ns.batch} x {ns.seq_len} tokens")  # fmt: skip

        stream = datasets.load_dataset("json", data_files=str(docs), split="train", streaming=True)
        source = _StreamSource("stream", stream, "text", infinite=True)
        windows = iter(PackedTextDataset(source, tok, ns.seq_len, (0, 1)))
        streamed = rate(iter(lambda: [next(windows) for _ in range(ns.batch)], None),
                        ns.batches, per_batch)  # fmt: skip
        print(f"streamed (tokenized per window): {streamed:12,.0f} tokens/s")

        start = time.perf_counter()
        loader = build_dataloader(Data(path=str(docs)), tok, seq_len=ns.seq_len,
                                  local_batch_size=ns.batch)  # fmt: skip
        built = time.perf_counter() - start
        print(f"tokenized at start-up:           {rate(loader, ns.batches, per_batch):12,.0f} "
              f"tokens/s (after {built:.1f} s building)")  # fmt: skip

        for workers in (1, 2):
            prefix = Path(tmp) / f"pre{workers}"
            meta = preprocess.run([str(docs), "--output-prefix", str(prefix),
                                   "--workers", str(workers), "--quiet"])  # fmt: skip
            speed = meta["n_tokens"] / meta["seconds"]
            print(f"preprocess_data.py, {workers} worker(s): {speed:12,.0f} tokens/s, "
                  f"{speed / workers:,.0f} per worker")  # fmt: skip
        loader = build_dataloader(Data(path=str(prefix)), tok, seq_len=ns.seq_len,
                                  local_batch_size=ns.batch)  # fmt: skip
        print(
            f"preprocessed (memory-mapped):    {rate(loader, ns.batches, per_batch):12,.0f} "
            "tokens/s"
        )


if __name__ == "__main__":
    main()
