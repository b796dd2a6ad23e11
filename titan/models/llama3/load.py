"""Load a Llama 3 model for inference from a titan DCP folder or a Hugging Face one, in one
process or tensor parallel (generation, HF parity checks).
"""

import json
import warnings
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan.checkpoint.dcp_io import load_dcp_model, read_dcp_metadata
from titan.converters.lora import is_adapter_key
from titan.errors import CheckpointError
from titan.models.llama3.args import ModelArgs
from titan.models.llama3.hf_io import read_hf_config, resolve_model_args
from titan.models.llama3.hf_load import load_hf_weights
from titan.models.llama3.model import Transformer
from titan.models.llama3.parallelize import apply_tp, check_tp_degree


def checkpoint_kind(path: str | Path) -> str:
    """ "dcp" for a titan DCP folder (model-only or a training checkpoint), "hf" for a
    transformers one (config.json + safetensors); else FileNotFoundError."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return "dcp"
    if (path / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither a titan DCP folder (.metadata) nor a transformers one (config.json)"
    )


def checkpoint_args(
    path: str | Path,
    flavor: str | None = None,
    config_json: str | Path | None = None,
    fallback_config: dict | None = None,
) -> ModelArgs:
    """The architecture of the checkpoint at `path`: from `config_json` when given, else an HF
    folder's own config.json (a DCP folder records none: `fallback_config`, e.g. that of the
    HF folder it came from), checked against `flavor` when both are given."""
    kind = checkpoint_kind(path)
    if config_json is not None:
        config = json.loads(Path(config_json).read_text())
    else:
        config = fallback_config if kind == "dcp" else read_hf_config(path)
    if config is None and flavor is None:
        raise ValueError(
            f"{path} is a DCP folder, which does not record the architecture: give --flavor or "
            "--config-json"
        )
    return resolve_model_args(flavor, config)


def load_model(
    path: str | Path,
    args: ModelArgs,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tp_mesh: DeviceMesh | None = None,
) -> Transformer:
    """An eval-mode Transformer of `dtype` on `device` holding the weights of the DCP or HF
    folder `path`; with `tp_mesh`, sharded over it (replicated logits) as each rank's part."""
    kind = checkpoint_kind(path)
    if tp_mesh is not None:
        check_tp_degree(args, tp_mesh.size())
    # (1) on the meta device, (3) parallelize, (4) to_empty, (5) init_weights, then load
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if tp_mesh is not None:
        # logits replicated: every rank samples from the whole vocabulary
        apply_tp(model, tp_mesh, sequence_parallel=False, loss_parallel=False)
    model.to_empty(device=device)
    with torch.no_grad(), warnings.catch_warnings():
        # DTensor warns that its random ops on a CPU mesh are incomplete: these weights are
        # overwritten below, init_weights is run for the RoPE table
        warnings.filterwarnings("ignore", message="DTensor random operators")
        model.init_weights(buffer_device=torch.device(device))
    if kind == "dcp":
        stored = read_dcp_metadata(path).state_dict_metadata
        if any(is_adapter_key(k) for k in stored):  # the base alone would be silently wrong
            raise CheckpointError(
                f"{path} holds LoRA adapters: merge them into the weights first "
                f"(titan-convert-to-hf {path} OUT_DIR --merge-lora ...), then use "
                "OUT_DIR"
            )
        load_dcp_model(path, model, stored)  # reads only this rank's shards of DTensors
    else:
        load_hf_weights(model, path, args)  # reads only this rank's shards of DTensors
    return model.eval()
