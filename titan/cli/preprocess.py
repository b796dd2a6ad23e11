"""Tokenize documents once, in parallel, into titan's token files; train on them by index.

  titan-preprocess INPUT... --output-prefix PREFIX [--tokenizer PATH]
      [--workers N] [--text-field text] [--split train] [--config-name NAME]
  ./run_train.sh --data.path PREFIX

Each INPUT is a file or folder (jsonl, json, parquet, txt: a document per paragraph, arrow;
optionally compressed) or a Hugging Face hub dataset name; they are read in the order given.
Writes PREFIX.bin (every document's ids, BOS ... EOS, back to back: uint16 when the vocabulary
fits, else uint32), PREFIX.idx (numpy int64: where each document starts, and the end) and
PREFIX.json (counts, the largest id, the tokenizer's path and sha256, the inputs), the last
only once the others are complete. Training checks all three against each other and against
its own tokenizer and vocabulary. Prints a progress bar and a summary (documents, tokens,
tokens/s in all and per worker).
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from titan.config.job_config import Data
from titan.data.dataloader import _load_hub, _load_local
from titan.data.streaming import document_text
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.data.tokens import (
    FORMAT,
    encode_texts,
    token_dtype,
    tokenizer_identity,
)

CHUNK = 256  # documents per task handed to a worker


def load_inputs(inputs: list[str], ns: argparse.Namespace):
    """One map-style dataset of the text column of every input, in order."""
    import datasets

    parts = []
    for item in inputs:
        if Path(item).exists():
            cfg = Data(path=item, split=ns.split, text_field=ns.text_field)
            try:
                dataset = _load_local(cfg)
            except Exception as e:  # datasets' own errors say little (an empty file: StopIteration)
                sys.exit(f"{item} cannot be read as documents ({type(e).__name__}: {e})")
        else:
            cfg = Data(dataset=item, config_name=ns.config_name, split=ns.split, streaming=False)
            dataset = _load_hub(cfg)
        if ns.text_field not in dataset.column_names:
            sys.exit(f"{item} has no column {ns.text_field!r}; its columns are "
                     f"{dataset.column_names}: pick one with --text-field")  # fmt: skip
        if len(dataset) == 0:
            sys.exit(f"{item} has no documents")
        parts.append(dataset.select_columns([ns.text_field]))
    return datasets.concatenate_datasets(parts)


def preprocess(ns: argparse.Namespace) -> dict:
    from tqdm import tqdm

    tok = build_tokenizer(ns.tokenizer)
    dataset = load_inputs(ns.inputs, ns)
    prefix = Path(ns.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".bin", ".idx"):  # an older result stays invalid until we finish
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    n_docs, field, name = len(dataset), ns.text_field, " ".join(ns.inputs)
    tasks = (
        (
            ns.tokenizer,
            [document_text({field: t}, field, name) for t in dataset[i : i + CHUNK][field]],
        )
        for i in range(0, n_docs, CHUNK)
    )
    lengths, max_id, start = [], 0, time.perf_counter()
    bin_tmp = Path(f"{prefix}.bin.tmp")
    with (
        open(bin_tmp, "wb") as out,
        multiprocessing.get_context("spawn").Pool(ns.workers) as pool,
        tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=ns.quiet) as bar,
    ):
        for docs in pool.imap(encode_texts, tasks):  # in order, so the ids follow the inputs
            for ids in docs:
                ids.tofile(out)
                lengths.append(len(ids))
                max_id = max(max_id, int(ids.max()))
            bar.update(len(docs))
    seconds = time.perf_counter() - start
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(f"{prefix}.idx.tmp", "wb") as f:
        np.save(f, offsets)
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(f"{prefix}.idx.tmp", f"{prefix}.idx")
    n_tokens = int(offsets[-1])
    meta = {
        "format": FORMAT, "dtype": token_dtype(tok.n_words).name, "n_documents": n_docs,
        "n_tokens": n_tokens, "max_token_id": max_id, "bos": True, "eos": True,
        "tokenizer": tokenizer_identity(tok), "inputs": ns.inputs, "text_field": ns.text_field,
        "split": ns.split, "seconds": round(seconds, 3), "workers": ns.workers,
    }  # fmt: skip
    Path(f"{prefix}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def run(argv: list[str] | None = None) -> dict:
    """Parse the arguments, preprocess, print the summary; returns the written metadata."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", default=SHIPPED_TOKENIZER, help="tokenizer.model path")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--config-name", default=None, help="hub dataset config (subset)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = p.parse_args(argv)
    if ns.workers < 1:
        p.error("--workers must be >= 1")
    meta = preprocess(ns)
    rate = meta["n_tokens"] / max(meta["seconds"], 1e-9)
    print(f"{meta['n_documents']:,} documents, {meta['n_tokens']:,} tokens in "
          f"{meta['seconds']:.1f} s: {rate:,.0f} tokens/s ({rate / ns.workers:,.0f} per worker, "
          f"{ns.workers} workers) -> {ns.output_prefix}.bin/.idx/.json")  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
