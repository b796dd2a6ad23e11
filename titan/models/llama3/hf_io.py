"""Read and write Llama 3 weights as Hugging Face safetensors folders.

Names and the q/k row permutation come from `state_dict_adapter`; this file adds the files,
config.json <-> `ModelArgs`, and clear errors. titan's own DCP model folders: `dcp_io`.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from titan.checkpoint.dcp_io import atomic_dir
from titan.config.job_config import Lora
from titan.errors import CheckpointError
from titan.models.llama3.args import FLAVORS, ModelArgs, RoPEScaling
from titan.models.llama3.model import Transformer
from titan.models.llama3.state_dict_adapter import (
    HF_LINEARS,
    from_hf,
    hf_config_dict,
    lora_to_peft,
    to_hf,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "original/tokenizer.model",
)
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_EOS = (128000, 128001)  # <|begin_of_text|>, <|end_of_text|> in Meta's vocabulary

# Compared between config.json and a flavor: every field, as a new one may change the weights or
# the outputs, except max_seq_len, which only sizes the RoPE table (a run may train shorter),
# and multiple_of / ffn_dim_multiplier, which are compared through the ffn_hidden_dim they give.
ARCH_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ModelArgs)
    if f.name not in ("max_seq_len", "multiple_of", "ffn_dim_multiplier")
)


# ---- config.json <-> ModelArgs ------------------------------------------------------------


def read_hf_config(hf_dir: str | Path) -> dict:
    """The config.json of a transformers checkpoint folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a transformers checkpoint folder")
    return json.loads(path.read_text())


def _rope_from_config(config: dict) -> tuple[float, RoPEScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling (None, or a dict keyed `rope_type` or the
    # older `type`); 5.x writes one rope_parameters dict that also holds rope_theta.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported (titan implements llama3 only)")
    scaling = RoPEScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
    return theta, scaling


def args_from_hf_config(config: dict) -> ModelArgs:
    """ModelArgs for a transformers LlamaConfig dict (config.json of 4.x or 5.x)."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type {config['model_type']!r} is not a Llama model")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise ValueError(f"config {key}={config[key]!r} is not supported (Llama 3 has {want})")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(
            f"head_dim {config['head_dim']} != hidden_size / num_attention_heads "
            f"({dim // n_heads}): titan derives head_dim and cannot represent this model"
        )
    theta, scaling = _rope_from_config(config)
    hidden = config["intermediate_size"]
    args = ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        # ModelArgs derives the FFN size by rounding up to multiple_of: rounding anything in
        # (0, hidden] up to a multiple of `hidden` gives exactly `hidden`.
        multiple_of=hidden,
        ffn_dim_multiplier=None if hidden >= int(8 * dim / 3) else hidden / int(8 * dim / 3),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # transformers' default
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    assert args.ffn_hidden_dim == hidden, (args.ffn_hidden_dim, hidden)
    return args


def check_args_match(args: ModelArgs, flavor_args: ModelArgs, flavor: str = "flavor") -> None:
    """Raise ValueError naming every architecture field where `args` (from config.json) and
    `flavor_args` differ. vocab_size must match too: it sets the embedding and output shapes,
    so weights of another vocabulary cannot load into the flavor's model."""
    diffs = [
        f"{name}: config.json {getattr(args, name)!r} vs {flavor} {getattr(flavor_args, name)!r}"
        for name in ARCH_FIELDS
        if getattr(args, name) != getattr(flavor_args, name)
    ]
    if diffs:
        raise ValueError(f"config.json does not match --flavor {flavor}:\n  " + "\n  ".join(diffs))


def resolve_model_args(flavor: str | None, config: dict | None) -> ModelArgs:
    """The architecture from `--flavor`, from a config.json dict, or from both once they agree
    (then the flavor's args, whose max_seq_len titan trains with)."""
    if flavor is not None and flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose from {', '.join(FLAVORS)}")
    if config is None:
        if flavor is None:
            raise ValueError("the architecture is unknown: give a flavor or a config.json")
        return FLAVORS[flavor]
    args = args_from_hf_config(config)
    if flavor is None:
        return args
    check_args_match(args, FLAVORS[flavor], flavor)
    return FLAVORS[flavor]


# ---- titan state dicts ------------------------------------------------------------------------


def empty_model(args: ModelArgs, dtype: torch.dtype = torch.float32) -> Transformer:
    """A CPU Transformer with uninitialized weights of `dtype`, to load a checkpoint into.
    The RoPE table is not built: call `init_weights()` before running it."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    return model.to_empty(device="cpu")


def check_titan_state_dict(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, source: str
) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the model's keys and shapes."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in expected.keys() & state_dict.keys()
        if state_dict[k].shape != expected[k]
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {sorted(shapes)[:5]}"
        )


def titan_state_dict_from_hf(hf_dir: str | Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """A transformers checkpoint's weights under titan's names, checked against `args`: the
    whole model in memory (to convert a folder; `hf_load` loads a model's own pieces)."""
    return titan_from_hf_checked(load_hf_state_dict(hf_dir), args, str(hf_dir))


def titan_from_hf_checked(
    hf_sd: dict[str, torch.Tensor], args: ModelArgs, source: str
) -> dict[str, torch.Tensor]:
    """`from_hf`, then CheckpointError unless the result has exactly the model's keys and
    shapes. Meta tensors check a folder from its headers alone."""
    if args.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)  # some exports repeat the tied matrix; titan re-ties
    try:
        sd = from_hf(hf_sd, args)
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None
    check_titan_state_dict(sd, args, source)
    return sd


# ---- Hugging Face safetensors folders ---------------------------------------------------------


def hf_tensor_files(hf_dir: str | Path) -> dict[str, Path]:
    """Each tensor of a transformers safetensors checkpoint (one file or an index of shards)
    and the file that holds it, from the files' headers."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder not found: {hf_dir}")
    if (hf_dir / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            if not (hf_dir / shard).is_file():
                raise FileNotFoundError(f"{hf_dir / shard} (listed in {INDEX_FILE}) not found")
            with safe_open(hf_dir / shard, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), hf_dir / shard))
        missing = sorted(weight_map.keys() - files.keys())
        if missing:
            raise CheckpointError(f"{hf_dir}: tensors in {INDEX_FILE} but in no shard: {missing}")
        return files
    if (hf_dir / SINGLE_FILE).is_file():
        with safe_open(hf_dir / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), hf_dir / SINGLE_FILE)
    raise FileNotFoundError(
        f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: expected a transformers "
        "checkpoint saved as safetensors (.bin and Meta's .pth files are not read)"
    )


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers safetensors checkpoint (one file or an index of shards)."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(hf_tensor_files(hf_dir).values()):
        state_dict.update(load_file(file))
    return state_dict


def _tokenizer_bos_eos(tokenizer_dir: Path) -> tuple[int, int] | None:
    """bos/eos ids from a tiktoken tokenizer.model (read by titan's Tokenizer) or tokenizer.json."""
    for name in ("tokenizer.model", "original/tokenizer.model"):
        if (tokenizer_dir / name).is_file():
            from titan.data.tokenizer import TiktokenTokenizer  # tiktoken: only needed here

            tok = TiktokenTokenizer(tokenizer_dir / name)
            return tok.bos_id, tok.eos_id
    if (tokenizer_dir / "tokenizer.json").is_file():
        added = json.loads((tokenizer_dir / "tokenizer.json").read_text()).get("added_tokens", [])
        by_name = {t["content"]: t["id"] for t in added}
        if "<|begin_of_text|>" in by_name and "<|end_of_text|>" in by_name:
            return by_name["<|begin_of_text|>"], by_name["<|end_of_text|>"]
    return None


def _special_token_ids(args: ModelArgs, tokenizer_dir: Path | None) -> dict[str, int]:
    """bos/eos ids: the tokenizer's when given, Meta's for the full Llama 3 vocabulary, else none
    (a guess would be wrong for titan's small debug vocabulary)."""
    ids = _tokenizer_bos_eos(tokenizer_dir) if tokenizer_dir is not None else None
    if ids is None and args.vocab_size == LLAMA3_VOCAB_SIZE:
        ids = LLAMA3_BOS_EOS
    if ids is None:
        return {}
    if max(ids) >= args.vocab_size:
        raise ValueError(f"tokenizer ids {ids} do not fit vocab_size {args.vocab_size}")
    return {"bos_token_id": ids[0], "eos_token_id": ids[1]}


def _tokenizer_files(tokenizer_dir: Path) -> list[str]:
    found = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}"
        )
    return found


def _shards(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int
) -> list[list[str]]:
    """Group names, in order, into shards of at most max_bytes (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    size, item = 0, torch.empty((), dtype=dtype).element_size()
    for name, t in tensors.items():
        nbytes = t.numel() * item
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf_checkpoint(
    state_dict_titan: dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a folder `transformers.AutoModelForCausalLM.from_pretrained` loads: safetensors
    shards + index, config.json, generation_config.json and the tokenizer's files. Returns the
    index (metadata.total_size and weight_map)."""
    out_dir = Path(out_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok_dir is not None:  # fail before writing
        _tokenizer_files(tok_dir)
        _special_token_ids(args, tok_dir)
    hf_sd = to_hf(state_dict_titan, args)  # drops lm_head when tied: transformers re-ties
    shards = _shards(hf_sd, dtype, max_shard_bytes)
    index: dict = {"metadata": {"total_size": 0}, "weight_map": {}}
    with atomic_dir(out_dir, overwrite) as tmp:
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            shard: dict[str, torch.Tensor] = {}
            seen: set[int] = set()
            for name in names:
                t = hf_sd[name].detach().to("cpu", dtype).contiguous()
                if t.data_ptr() in seen:  # safetensors refuses tensors sharing memory
                    t = t.clone()
                seen.add(t.data_ptr())
                shard[name] = t
                index["weight_map"][name] = file
                index["metadata"]["total_size"] += t.numel() * t.element_size()
            save_file(shard, tmp / file, metadata={"format": "pt"})
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_hf_metadata(tmp, args, dtype, tok_dir)
    return index


def write_hf_metadata(
    folder: Path, args: ModelArgs, dtype: torch.dtype, tokenizer_dir: Path | None = None
) -> None:
    """config.json, generation_config.json and the tokenizer's files (from `tokenizer_dir`) of
    a transformers folder whose weights are `dtype` (the weights are written apart)."""
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    token_ids = _special_token_ids(args, tokenizer_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    # transformers 5 reads "dtype", 4.x reads "torch_dtype"
    config = hf_config_dict(args) | {"torch_dtype": dtype_name, "dtype": dtype_name}
    (folder / "config.json").write_text(json.dumps(config | token_ids, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
    for name in tok_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer_dir / name, folder / name)


def save_peft_adapter(
    adapters: dict[str, torch.Tensor],
    args: ModelArgs,
    lora: Lora,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write LoRA/DoRA adapters (titan's names) as a PEFT folder, adapter_config.json and
    adapter_model.safetensors, that `peft.PeftModel.from_pretrained(base, out_dir)` loads on
    the transformers export of the base weights. Returns the number of tensors written."""
    tensors = {
        k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_to_peft(adapters, args).items()
    }
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_LINEARS[t] for t in set(lora.target_modules)),
        "use_dora": lora.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(tensors)
