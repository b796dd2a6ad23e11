"""Training data: documents tokenized with BOS/EOS, packed back to back into fixed windows.

`build_dataloader` returns a loader whose state_dict() resumes exactly. Sources: the embedded
corpus, synthetic tokens, local files (.txt gives a document per paragraph), files written by
titan-preprocess, or the hub; data.format = chat reads chat examples (titan.data.chat) from
files, from titan-preprocess --format chat's files or from the hub. All but streamed hub datasets
are read by global window index (titan.data.tokens): a step's data is the same under any
data-parallel layout, and resumes under any. A stream cannot be indexed cheaply: each dp rank
reads its own shard of it, and its position resumes only under the same data-parallel degree.
"""

import dataclasses
import functools
import gzip
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titan.config.job_config import Data
from titan.data.blend import BlendedWindows, parse_blend, parse_schedule
from titan.data.chat import ChatExamples, ChatWindows
from titan.data.streaming import (
    DocumentSource,
    PackedTextDataset,
    _StreamSource,
    document_text,
    stack_windows,
)
from titan.data.tokenizer import Tokenizer
from titan.data.tokens import (
    DataError,
    GlobalBatchLoader,
    PackedWindows,
    SyntheticWindows,
    TokenDocuments,
    first_window,
)
from titan.logger import logger

CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "default_corpus.jsonl.gz"
OFFLINE_ALTERNATIVES = (
    "--data.dataset default (the embedded corpus), --data.path /local/files "
    "(jsonl, json, parquet, txt, arrow), or --data.dataset synthetic (random tokens)"
)
# File extension -> Hugging Face `datasets` builder; compressed files keep their inner extension.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}


@functools.cache
def load_embedded_corpus() -> tuple[str, ...]:
    """The documents of titan/assets/default_corpus.jsonl.gz, in file order."""
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(
            f"embedded corpus {CORPUS_PATH} is missing: reinstall titan, or in a checkout rebuild "
            f"it with `python scripts/build_default_corpus.py`"
        )
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def _builder_of(file: Path) -> str | None:
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _files_by_builder(path: Path) -> dict[str, list[str]]:
    """The readable files at `path` (a file, or a folder searched recursively), by builder."""
    files = [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    by_builder: dict[str, list[str]] = {}
    for file in files:
        if (builder := _builder_of(file)) is not None:
            by_builder.setdefault(builder, []).append(str(file))
    return by_builder


def _load_local(cfg: Data) -> Any:
    """A map-style `datasets.Dataset` of the file or folder at cfg.path."""
    import datasets

    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data.path {cfg.path!r} does not exist")
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))  # a folder written by save_to_disk
        return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    by_builder = _files_by_builder(path)
    if len(by_builder) != 1:
        found = "no files" if not by_builder else f"several formats ({sorted(by_builder)})"
        raise DataError(
            f"--data.path {cfg.path!r}: found {found}; expected files of one format with an "
            f"extension among {sorted(BUILDERS)} (optionally compressed: {sorted(COMPRESSION)})"
        )
    builder, data_files = next(iter(by_builder.items()))
    # A text file is one long string: a paragraph per document keeps BOS/EOS meaningful
    # without holding a whole book in memory as one document.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(
        builder, data_files={cfg.split: data_files}, split=cfg.split, **options
    )


def _load_hub(cfg: Data) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            cfg.dataset, cfg.config_name, split=cfg.split, streaming=cfg.streaming
        )
    except Exception as e:
        # One clear line instead of the retry log and a chain of connection errors.
        raise DataError(
            f"could not load Hugging Face dataset {cfg.dataset!r} (config {cfg.config_name!r}, "
            f"split {cfg.split!r}): {type(e).__name__}: {e}. Without network, or with a "
            f"dataset that does not exist, train on {OFFLINE_ALTERNATIVES}."
        ) from None


def build_documents(cfg: Data, tokenizer: Tokenizer, vocab_size: int) -> TokenDocuments | None:
    """The training documents to read by index (data.holdout_every's held out), or None for a
    streamed hub dataset."""
    docs = all_documents(cfg, tokenizer, vocab_size)
    return docs.split(cfg.holdout_every)[0] if docs is not None else None


def all_documents(cfg: Data, tokenizer: Tokenizer, vocab_size: int) -> TokenDocuments | None:
    """Every document of data.dataset or data.path (none held out), or None for a stream."""
    if cfg.path is None and cfg.dataset == "default":
        docs = load_embedded_corpus()
        return TokenDocuments.from_texts("the embedded corpus", len(docs), docs.__getitem__,
                                         tokenizer)  # fmt: skip
    if _preprocessed(cfg.path):
        return TokenDocuments.load(cfg.path, tokenizer, vocab_size)
    name = f"--data.path {cfg.path}" if cfg.path else f"dataset {cfg.dataset!r}"
    dataset = _load_local(cfg) if cfg.path else _load_hub(cfg)
    columns = dataset.column_names  # None for some streams: then checked at the first example
    if columns is not None and cfg.text_field not in columns:
        raise DataError(
            f"{name} has no column {cfg.text_field!r}; its columns are {columns}. "
            f"Pick one with --data.text_field"
        )
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return None
    dataset = dataset.select_columns([cfg.text_field])
    text = lambda i: document_text(dataset[i], cfg.text_field, name)  # noqa: E731
    return TokenDocuments.from_texts(name, len(dataset), text, tokenizer)


def _preprocessed(path: str | None) -> bool:
    """Whether data.path names titan-preprocess's files (a prefix, not a file or folder)."""
    written = (Path(f"{path}{suffix}").is_file() for suffix in (".json", ".bin", ".idx"))
    return path is not None and not Path(path).exists() and any(written)


def all_chat_examples(cfg: Data, tokenizer: Tokenizer, vocab_size: int) -> ChatExamples:
    """Every example of data.path or data.dataset (data.format = "chat"), checked and rendered,
    or memory-mapped as titan-preprocess --format chat rendered them."""
    from datasets import Dataset

    if _preprocessed(cfg.path):
        return ChatExamples.load(cfg.path, tokenizer, vocab_size)
    name = f"--data.path {cfg.path}" if cfg.path else f"dataset {cfg.dataset!r}"
    dataset = _load_local(cfg) if cfg.path else _load_hub(cfg)
    if not isinstance(dataset, Dataset):
        raise DataError(
            f"{name}: chat examples are read by index, which a stream cannot be: set "
            "--data.streaming false (downloads it) or give --data.path"
        )
    field = cfg.messages_field
    if field not in dataset.column_names:
        raise DataError(f"{name}: example 0 has no {field!r} field (columns: "
                        f"{dataset.column_names}); name it with --data.messages_field")  # fmt: skip
    rows = dataset.select_columns([field])
    return ChatExamples.from_rows(name, len(rows), rows.__getitem__, field, tokenizer)


def build_chat_windows(
    cfg: Data,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    part: str = "train",
    vocab_size: int | None = None,
) -> ChatWindows:
    """Windows of chat examples: part "train" (data.holdout_every's held out; shuffled and
    repeated as data.shuffle and data.infinite say), "holdout" or "all" (one pass, in order).
    vocab_size: the model's (preprocessed token ids must fit it)."""
    examples = all_chat_examples(cfg, tokenizer, vocab_size or tokenizer.n_words)
    if part != "all":
        examples = examples.split(cfg.holdout_every)[part == "holdout"]
    train = part == "train"
    windows = ChatWindows(examples, seq_len, tokenizer.pad_id, seed, cfg.shuffle and train,
                          cfg.infinite and train, cfg.packing)  # fmt: skip
    if windows.n_truncated:
        logger.warning(f"data: {windows.n_truncated:,} of {examples.n_docs:,} chat examples of "
                       f"{examples.name} are longer than seq_len + 1 = {seq_len + 1} tokens: "
                       "each keeps its first seq_len + 1")  # fmt: skip
    targets = examples.n_targets()
    how = "packed" if cfg.packing else "one a window"
    logger.info(f"data: {examples.name}, {examples.n_docs:,} chat examples, "
                f"{int(examples.lengths.sum()):,} tokens ({targets:,} targets), "
                f"{windows.windows_in_epoch(0):,} windows an epoch ({how})")  # fmt: skip
    return windows


def build_blend(
    cfg: Data, tokenizer: Tokenizer, seq_len: int, seed: int, vocab_size: int
) -> BlendedWindows:
    """data.blend's sources mixed by weight, reweighted at data.blend_schedule's token counts."""
    blend = parse_blend(cfg.blend)
    phases = [(0, [w for w, _ in blend])]
    for tokens, weights in parse_schedule(cfg.blend_schedule, len(blend)):
        phases.append((first_window(tokens, seq_len), weights))
    sources = []
    for c, (_, name) in enumerate(blend):
        one = dataclasses.replace(cfg, dataset="default", path=None if name == "default" else name,
                                  blend=[], blend_schedule=[])  # fmt: skip
        try:
            docs = build_documents(one, tokenizer, vocab_size)
            if docs is None:
                raise DataError("a streamed dataset cannot be blended: preprocess it first")
            sources.append(PackedWindows(docs, seq_len, seed + 7919 * c, cfg.shuffle,
                                         cfg.infinite))  # fmt: skip
        except (DataError, FileNotFoundError) as e:
            raise DataError(f"data.blend source {name!r}: {e}") from None
    share = ", ".join(f"{w:g} {name}" for w, name in blend)
    logger.info(f"data: blend of {share}; {len(phases) - 1} reweighting(s)")
    return BlendedWindows(sources, phases, seed)


def build_stream(cfg: Data, dp_rank: int, dp_degree: int) -> DocumentSource:
    """This rank's shard of a streamed hub dataset."""
    from datasets.distributed import split_dataset_by_node

    dataset = split_dataset_by_node(_load_hub(cfg), rank=dp_rank, world_size=dp_degree)
    return _StreamSource(f"dataset {cfg.dataset!r}", dataset, cfg.text_field, cfg.infinite)


def document_ids(inputs: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Each token's document within its window, (bs, seqlen) like `inputs`: the packer starts
    every document with BOS, so the documents are the runs that begin at a BOS (the head of a
    window before its first BOS is the tail of an earlier document: index 0)."""
    return torch.cumsum(inputs == bos_id, dim=1)


def build_dataloader(
    cfg: Data,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int = 0,
    dp_degree: int = 1,
    accumulation: int | list[tuple[int, int]] = 1,
    seed: int = 0,
    vocab_size: int | None = None,
    dry_run: bool = False,
) -> GlobalBatchLoader | StatefulDataLoader:
    """A loader of (inputs, labels) int64 batches of shape (local_batch_size, seq_len) for one
    dp rank, `accumulation` micro-batches per step (or [(first window, count)] for a growing
    batch: runtime.grad_accumulation_steps); `seed` orders the documents of every epoch
    (data.shuffle) and draws synthetic tokens. vocab_size: the model's (token ids must fit it).
    A dry run reads nothing: synthetic tokens."""
    if dry_run and cfg.dataset != "synthetic":
        logger.info("dry run: synthetic tokens instead of data.dataset (nothing is read)")
        cfg = dataclasses.replace(cfg, dataset="synthetic", path=None, format="text")
    if not 0 <= dp_rank < dp_degree:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_degree={dp_degree})")
    if seq_len < 1 or local_batch_size < 1:
        raise ValueError(
            f"seq_len ({seq_len}) and local_batch_size ({local_batch_size}) must be >= 1"
        )
    where = f"dp rank {dp_rank} of {dp_degree}"
    if cfg.dataset == "synthetic":
        if cfg.path is not None:
            logger.warning(f"data: --data.dataset synthetic ignores --data.path {cfg.path}")
        windows = SyntheticWindows(tokenizer.n_words, seq_len, seed)
        logger.info(f"data: synthetic tokens (seed {seed}), {where}, global sample order")
        return GlobalBatchLoader(windows, local_batch_size, dp_rank, dp_degree, accumulation)
    if cfg.format == "chat":
        windows = build_chat_windows(cfg, tokenizer, seq_len, seed, vocab_size=vocab_size)
        return GlobalBatchLoader(windows, local_batch_size, dp_rank, dp_degree, accumulation)
    if cfg.blend:
        windows = build_blend(cfg, tokenizer, seq_len, seed, vocab_size or tokenizer.n_words)
        return GlobalBatchLoader(windows, local_batch_size, dp_rank, dp_degree, accumulation)
    docs = build_documents(cfg, tokenizer, vocab_size or tokenizer.n_words)
    if docs is not None:
        windows = PackedWindows(docs, seq_len, seed, cfg.shuffle, cfg.infinite)
        order = f"shuffled by seed {seed} each epoch" if cfg.shuffle else "in order"
        logger.info(f"data: {docs.name}, {docs.n_docs:,} documents, {len(docs.tokens):,} "
                    f"tokens, {order}; {where}, global sample order")  # fmt: skip
        return GlobalBatchLoader(windows, local_batch_size, dp_rank, dp_degree, accumulation)
    if cfg.holdout_every:
        raise DataError("data.holdout_every counts documents, which a stream cannot hold "
                        "out: preprocess the data (titan-preprocess)")  # fmt: skip
    if not isinstance(accumulation, int) and len(accumulation) > 1:
        raise DataError("training.batch_size_schedule counts the windows read, which a stream "
                        "cannot: preprocess the data (titan-preprocess)")  # fmt: skip
    source = build_stream(cfg, dp_rank, dp_degree)
    logger.warning(
        f"data: {source.name} is streamed: each dp rank reads its own shard, so the data of a "
        "step depends on the data-parallel degree and resumes only under the same one; "
        "titan-preprocess makes it indexable (global order, any layout)"
    )
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which newer torch deprecates; nothing to act on.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        # num_workers=0: the dataset's state is then exactly that of the batches handed out.
        loader = StatefulDataLoader(
            PackedTextDataset(source, tokenizer, seq_len, (dp_rank, dp_degree)),
            batch_size=local_batch_size, collate_fn=stack_windows,
        )  # fmt: skip
    loader.state_key = f"dp{dp_rank}_of_{dp_degree}"
    loader.accumulation = accumulation if isinstance(accumulation, int) else accumulation[0][1]
    return loader
