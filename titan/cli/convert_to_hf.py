"""Convert a titan DCP checkpoint (model-only or a full training one) into a Hugging Face folder.

    titan-convert-to-hf <dcp_dir> <hf_dir> --flavor 8B [--dtype bfloat16|float32]
        [--tokenizer-dir DIR] [--max-shard-size 5GB] [--overwrite]
    titan-convert-to-hf <dcp_dir> <hf_dir> --config-json path/to/config.json
    titan-convert-to-hf <lora_dcp_dir> <hf_dir> --flavor 8B --merge-lora
    titan-convert-to-hf <lora_dcp_dir> <peft_dir> --flavor 8B --peft \
        [--base-model meta-llama/Llama-3.1-8B] [--lora-config <dump_folder>/config.toml]

The architecture comes from --flavor, or from a transformers config.json (--config-json, e.g.
the one of the checkpoint a run was converted from) for shapes that are not a flavor; with both,
they must agree. The model is built on the meta device, given empty CPU tensors of --dtype
(default bfloat16, as Meta's releases), filled from the DCP folder, then written as safetensors
shards + index, config.json and generation_config.json, plus the tokenizer's files from
--tokenizer-dir (a folder, or a Hugging Face hub id whose tokenizer files are fetched,
titan.hub). `transformers.AutoModelForCausalLM.from_pretrained(hf_dir)` loads the result.

A checkpoint of a LoRA/DoRA run (model.converters = ["lora"]) holds the frozen base weights and
the adapters. Without flags the base is written. --merge-lora writes full weights with the
adapters merged; --peft writes the adapters alone as a PEFT folder, which
`peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_hf_dir), peft_dir)` loads
on the base's export. alpha and dropout come from the run's [lora] table: --lora-config, or the
nearest config.toml up to three folders above dcp_dir (training writes <dump_folder>/config.toml).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from titan.checkpoint.dcp_io import load_dcp_model, read_dcp_metadata
from titan.config import load_config
from titan.config.job_config import Lora
from titan.converters.lora import (
    apply_lora,
    is_adapter_key,
    merged_state_dict,
)
from titan.errors import CheckpointError
from titan.hub import resolve_model_path
from titan.models.llama3 import FLAVORS, ModelArgs
from titan.models.llama3.hf_io import (
    empty_model,
    resolve_model_args,
    save_hf_checkpoint,
    save_peft_adapter,
)
from titan.models.llama3.model import Transformer

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
    p.add_argument("--tokenizer-dir", type=Path, help="copy tokenizer files from here (or hub id)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing hf_dir")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true", help="merge LoRA/DoRA adapters in")
    lora.add_argument("--peft", action="store_true", help="write the adapters as a PEFT folder")
    p.add_argument("--lora-config", type=Path, help="the run's config.toml (its [lora] table)")
    p.add_argument("--base-model", help="--peft: base_model_name_or_path of adapter_config.json")
    args = p.parse_args(argv)
    if args.flavor is None and args.config_json is None:
        p.error("give --flavor or --config-json: a DCP folder does not record the architecture")
    return args


def lora_settings(dcp_dir: Path, config_toml: Path | None) -> Lora:
    """The run's [lora] table, checked against the adapters the checkpoint holds."""
    stored = read_dcp_metadata(dcp_dir).state_dict_metadata
    adapters = {k: tuple(v.size) for k, v in stored.items() if is_adapter_key(k)}
    if not adapters:
        raise CheckpointError(
            f"{dcp_dir} holds no LoRA adapters (a run without model.converters = ['lora']?): "
            "convert it without --merge-lora / --peft"
        )
    if config_toml is None:
        above = [d / "config.toml" for d in dcp_dir.resolve().parents[:3]]
        config_toml = next((f for f in above if f.is_file()), None)
        if config_toml is None:
            raise FileNotFoundError(
                f"no config.toml in the 3 folders above {dcp_dir}: give the run's config with "
                "--lora-config (alpha and dropout are not in the checkpoint)"
            )
    lora = load_config([], config_file=str(config_toml)).lora
    found = (
        {size[0] for k, size in adapters.items() if k.endswith(".lora_a")},  # ranks
        {k.rsplit(".", 2)[-2] for k in adapters},  # target linears
        any(k.endswith(".lora_magnitude") for k in adapters),  # DoRA
    )
    if found != ({lora.rank}, set(lora.target_modules), lora.use_dora):
        raise CheckpointError(
            f"the [lora] table of {config_toml} (rank {lora.rank}, target_modules "
            f"{sorted(lora.target_modules)}, use_dora {lora.use_dora}) does not match the "
            f"adapters in {dcp_dir} (rank {sorted(found[0])}, {sorted(found[1])}, DoRA "
            f"{found[2]}): give the run's own config.toml with --lora-config"
        )
    return lora


def convert_lora(args: argparse.Namespace, model_args: ModelArgs) -> str:
    """--merge-lora or --peft: the model with adapters, read in fp32, merged or split off."""
    lora = lora_settings(args.dcp_dir, args.lora_config)
    if args.merge_lora and model_args.tie_word_embeddings and "output" in lora.target_modules:
        raise ValueError(
            "--merge-lora: the output's adapter would untie it from the embedding, and a tied "
            "Hugging Face model has one matrix for both; export the adapters with --peft"
        )
    with torch.device("meta"):
        model = Transformer(model_args)
    apply_lora(model, lora)
    model.to_empty(device="cpu")
    load_dcp_model(args.dcp_dir, model)
    dtype = DTYPES[args.dtype]
    if args.peft:
        adapters = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
        n = save_peft_adapter(
            adapters, model_args, lora, args.hf_dir, dtype=dtype, base_model=args.base_model,
            overwrite=args.overwrite,
        )  # fmt: skip
        return f"wrote {args.hf_dir}: PEFT adapters, {n} tensors ({args.dtype})"
    index = save_hf_checkpoint(
        merged_state_dict(model), model_args, args.hf_dir, dtype=dtype,
        max_shard_bytes=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
        overwrite=args.overwrite,
    )  # fmt: skip
    n = len(index["weight_map"])
    return f"wrote {args.hf_dir}: {n} tensors with the adapters merged ({args.dtype})"


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns the summary line to print."""
    if args.tokenizer_dir is not None:
        args.tokenizer_dir = resolve_model_path(
            str(args.tokenizer_dir), "tokenizer", "--tokenizer-dir"
        )
    config = None
    if args.config_json is not None:
        if not args.config_json.is_file():
            raise FileNotFoundError(f"--config-json {args.config_json} not found")
        config = json.loads(args.config_json.read_text())
    model_args = resolve_model_args(args.flavor, config)
    if args.merge_lora or args.peft:
        return convert_lora(args, model_args)
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
