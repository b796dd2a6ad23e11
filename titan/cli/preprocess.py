"""Tokenize documents or chat examples once, in parallel, into token files read by index.

  titan-preprocess INPUT... --output-prefix PREFIX [--tokenizer PATH] [--workers N]
      [--format text|chat] [--text-field text] [--messages-field messages] [--split train]
      [--config-name NAME]
  ./run_train.sh --data.path PREFIX                      # text
  ./run_train.sh --data.path PREFIX --data.format chat   # --format chat

Each INPUT is a file or folder (jsonl, json, parquet, txt: a document per paragraph, arrow;
optionally compressed) or a Hugging Face hub dataset name; they are read in the order given.
Writes PREFIX.bin (every document's ids, BOS ... EOS, back to back: uint16 when the vocabulary
fits, else uint32), PREFIX.idx (numpy int64: where each document starts, and the end) and
PREFIX.json (counts, the largest id, the tokenizer's path and sha256, the inputs), the last
only once the others are complete. --format chat reads each row's list of messages instead
(--messages-field), renders it in Llama 3's chat template as training does (titan.data.chat:
an example is BOS ... <|eot_id|>), and writes PREFIX.targets beside the ids: a byte a token,
1 where the token is a target (assistant content and its <|eot_id|>); PREFIX.json records
kind "chat" (else "text"), the template's version and the count of targets.
Training checks all the files against each other and against its own tokenizer, vocabulary and
data.format. Prints a progress bar and a summary (documents, tokens, tokens/s in all and per
worker).
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from titan.config.job_config import Data
from titan.data.chat import TEMPLATE, encode_chats
from titan.data.dataloader import _load_hub, _load_local
from titan.data.streaming import document_text
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.data.tokens import (
    FORMAT,
    encode_texts,
    token_dtype,
    tokenizer_identity,
)
from titan.errors import DataError

CHUNK = 256  # documents per task handed to a worker
SUFFIXES = (".json", ".bin", ".idx", ".targets")  # .targets: --format chat only


def _column(ns: argparse.Namespace) -> tuple[str, str]:
    """(the column read, the flag that names it)."""
    if ns.format == "chat":
        return ns.messages_field, "--messages-field"
    return ns.text_field, "--text-field"


def load_inputs(inputs: list[str], ns: argparse.Namespace) -> list[tuple[str, Any]]:
    """(input, a map-style dataset of its text or messages column) of every input, in order."""
    field, flag = _column(ns)
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
        if field not in dataset.column_names:
            sys.exit(f"{item} has no column {field!r}; its columns are "
                     f"{dataset.column_names}: pick one with {flag}")  # fmt: skip
        if len(dataset) == 0:
            sys.exit(f"{item} has no documents")
        parts.append((item, dataset.select_columns([field])))
    return parts


def _tasks(parts: list[tuple[str, Any]], ns: argparse.Namespace) -> Iterator[tuple]:
    """The workers' tasks, CHUNK rows each, input after input (encode_texts or encode_chats)."""
    field, _ = _column(ns)
    for name, dataset in parts:
        for i in range(0, len(dataset), CHUNK):
            column = dataset[i : i + CHUNK][field]
            if ns.format == "chat":  # rows numbered within their input, for error messages
                yield ns.tokenizer, field, name, i, [{field: messages} for messages in column]
            else:
                yield ns.tokenizer, [document_text({field: t}, field, name) for t in column]


def preprocess(ns: argparse.Namespace) -> dict:
    from tqdm import tqdm

    tok = build_tokenizer(ns.tokenizer)
    parts = load_inputs(ns.inputs, ns)
    prefix = Path(ns.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in SUFFIXES:  # an older result stays invalid until we finish
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    chat, n_docs = ns.format == "chat", sum(len(dataset) for _, dataset in parts)
    lengths, max_id, n_targets, start = [], 0, 0, time.perf_counter()
    with (
        open(f"{prefix}.bin.tmp", "wb") as out,
        open(f"{prefix}.targets.tmp", "wb") if chat else contextlib.nullcontext() as targets_out,
        multiprocessing.get_context("spawn").Pool(ns.workers) as pool,
        tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=ns.quiet) as bar,
    ):
        work = encode_chats if chat else encode_texts
        for done in pool.imap(work, _tasks(parts, ns)):  # in order: the ids follow the inputs
            for one in done:
                ids, targets = one if chat else (one, None)
                ids.tofile(out)
                if chat:  # a byte a token, beside the ids
                    targets.astype(np.uint8).tofile(targets_out)
                    n_targets += int(targets.sum())
                lengths.append(len(ids))
                max_id = max(max_id, int(ids.max()))
            bar.update(len(done))
    seconds = time.perf_counter() - start
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(f"{prefix}.idx.tmp", "wb") as f:
        np.save(f, offsets)
    for suffix in SUFFIXES[1:] if chat else SUFFIXES[1:3]:
        os.replace(f"{prefix}{suffix}.tmp", f"{prefix}{suffix}")
    meta = {
        "format": FORMAT, "kind": ns.format, "dtype": token_dtype(tok.n_words).name,
        "n_documents": n_docs, "n_tokens": int(offsets[-1]), "max_token_id": max_id,
        "bos": True, "eos": not chat, "tokenizer": tokenizer_identity(tok), "inputs": ns.inputs,
        "split": ns.split, "seconds": round(seconds, 3), "workers": ns.workers,
    }  # fmt: skip
    if chat:  # examples end with <|eot_id|>, not EOS
        meta.update(messages_field=ns.messages_field, chat_template=TEMPLATE, n_targets=n_targets)
    else:
        meta["text_field"] = ns.text_field
    Path(f"{prefix}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def run(argv: list[str] | None = None) -> dict:
    """Parse the arguments, preprocess, print the summary; returns the written metadata."""
    first, rest = __doc__.split("\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", default=SHIPPED_TOKENIZER, help="tokenizer.model path")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="chat: rows of messages, rendered and masked as data.format = chat "
                   "trains on them, targets in PREFIX.targets")  # fmt: skip
    p.add_argument("--text-field", default="text")
    p.add_argument("--messages-field", default="messages", help="--format chat: the column of "
                   "each example's [{role, content}, ...] list")  # fmt: skip
    p.add_argument("--split", default="train")
    p.add_argument("--config-name", default=None, help="hub dataset config (subset)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = p.parse_args(argv)
    if ns.workers < 1:
        p.error("--workers must be >= 1")
    try:
        meta = preprocess(ns)
    except DataError as e:  # a bad document or example, named with its input and index
        for suffix in SUFFIXES:
            Path(f"{ns.output_prefix}{suffix}.tmp").unlink(missing_ok=True)
        sys.exit(str(e))
    rate = meta["n_tokens"] / max(meta["seconds"], 1e-9)
    chat = meta["kind"] == "chat"
    what = f"{meta['n_documents']:,} {'chat examples' if chat else 'documents'}"
    targets = f" ({meta['n_targets']:,} targets)" if chat else ""
    files = ".bin/.idx/.targets/.json" if chat else ".bin/.idx/.json"
    print(f"{what}, {meta['n_tokens']:,} tokens{targets} in {meta['seconds']:.1f} s: "
          f"{rate:,.0f} tokens/s ({rate / ns.workers:,.0f} per worker, {ns.workers} workers) "
          f"-> {ns.output_prefix}{files}")  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
