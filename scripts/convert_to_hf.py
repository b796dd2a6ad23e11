"""Convert a titan DCP checkpoint (model-only or a full training one) into a Hugging Face folder.

    python scripts/convert_to_hf.py <dcp_dir> <hf_dir> --flavor 8B [--dtype bfloat16|float32]
        [--tokenizer-dir DIR] [--max-shard-size 5GB] [--overwrite]
    python scripts/convert_to_hf.py <dcp_dir> <hf_dir> --config-json path/to/config.json

The architecture comes from --flavor, or from a transformers config.json (--config-json, e.g.
the one of the checkpoint a run was converted from) for shapes that are not a flavor; with both,
they must agree. The model is built on the meta device, given empty CPU tensors of --dtype
(default bfloat16, as Meta's releases), filled from the DCP folder, then written as safetensors
shards + index, config.json and generation_config.json, plus the tokenizer's files from
--tokenizer-dir. `transformers.AutoModelForCausalLM.from_pretrained(hf_dir)` loads the result.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing titan

from titan.components.dcp_io import CheckpointError, load_dcp_model  # noqa: E402
from titan.models.llama3 import FLAVORS  # noqa: E402
from titan.models.llama3.hf_io import (  # noqa: E402
    empty_model,
    resolve_model_args,
    save_hf_checkpoint,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' (transformers' decimal units), '500MiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dcp_dir", type=Path, help="titan DCP checkpoint folder")
    p.add_argument("hf_dir", type=Path, help="Hugging Face folder to create")
    p.add_argument("--flavor", choices=list(FLAVORS), help="architecture (see FLAVORS)")
    p.add_argument("--config-json", type=Path, help="architecture from a transformers config")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--tokenizer-dir", type=Path, help="copy tokenizer files from here")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing hf_dir")
    args = p.parse_args(argv)
    if args.flavor is None and args.config_json is None:
        p.error("give --flavor or --config-json: a DCP folder does not record the architecture")
    return args


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns the summary line to print."""
    config = None
    if args.config_json is not None:
        if not args.config_json.is_file():
            raise FileNotFoundError(f"--config-json {args.config_json} not found")
        config = json.loads(args.config_json.read_text())
    model_args = resolve_model_args(args.flavor, config)
    # (1) meta device: keys and shapes only; (2) empty CPU tensors of the export dtype, which
    # DCP fills in place, casting from the stored dtype
    model = empty_model(model_args, DTYPES[args.dtype])
    load_dcp_model(args.dcp_dir, model)
    index = save_hf_checkpoint(
        model.state_dict(),
        model_args,
        args.hf_dir,
        dtype=DTYPES[args.dtype],
        max_shard_bytes=args.max_shard_size,
        tokenizer_dir=args.tokenizer_dir,
        overwrite=args.overwrite,
    )
    n_shards = len(set(index["weight_map"].values()))
    return (
        f"wrote {args.hf_dir}: {len(index['weight_map'])} tensors in {n_shards} shard(s), "
        f"{index['metadata']['total_size']:,} bytes ({args.dtype})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args))
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
