"""Convert a Hugging Face Llama 3 checkpoint (safetensors) into a titan model-only DCP folder.

    titan-convert-from-hf <hf_dir> <dcp_dir> [--flavor 8B] [--dtype bfloat16]
    titan-convert-from-hf meta-llama/Llama-3.2-1B outputs/llama3_2_1b_dcp --flavor 1B

<hf_dir> is a transformers folder or a Hugging Face hub id (org/name[@revision]), whose
safetensors and config.json are fetched into the hub cache (titan.hub). The architecture comes
from <hf_dir>/config.json. With --flavor it must also match that
flavor (every field that changes the weights or the outputs; max_seq_len may differ), so the
result loads into `--model.flavor` runs. Without --flavor any Llama 3 shape converts. The DCP
folder holds `model.state_dict()` flat under titan's names; it is written next to <dcp_dir>
and renamed into place when complete. Weights keep the checkpoint's dtype unless --dtype.
"""

import argparse
import sys
from pathlib import Path

import torch

from titan.checkpoint.dcp_io import save_dcp_model
from titan.errors import CheckpointError
from titan.hub import resolve_model_path
from titan.models.llama3 import FLAVORS
from titan.models.llama3.hf_io import (
    read_hf_config,
    resolve_model_args,
    titan_state_dict_from_hf,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("hf_dir", help="transformers checkpoint folder (config.json) or hub id")
    p.add_argument("dcp_dir", type=Path, help="DCP folder to create")
    p.add_argument("--flavor", choices=list(FLAVORS), help="check config.json against it")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dcp_dir")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns the summary line to print."""
    hf_dir = resolve_model_path(args.hf_dir, "weights", "hf_dir")
    model_args = resolve_model_args(args.flavor, read_hf_config(hf_dir))
    sd = titan_state_dict_from_hf(hf_dir, model_args)
    if args.dtype is not None:
        cast = {k: v.to(DTYPES[args.dtype]) for k, v in sd.items()}
        if model_args.tie_word_embeddings:  # .to() copied the shared matrix twice: re-share it
            cast["output.weight"] = cast["tok_embeddings.weight"]
        sd = cast
    save_dcp_model(sd, args.dcp_dir, overwrite=args.overwrite)
    unique = {t.data_ptr(): t for t in sd.values()}.values()  # a tied matrix counts once
    n_params = sum(t.numel() for t in unique)
    n_bytes = sum(f.stat().st_size for f in args.dcp_dir.rglob("*") if f.is_file())
    dtypes = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
    return (
        f"wrote {args.dcp_dir}: {len(sd)} tensors, {n_params:,} parameters ({dtypes}), "
        f"{n_bytes:,} bytes on disk"
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
