"""Build Llama 3 for a run in titan's fixed order: (1) on the meta device, (2) converters,
(3) pipeline split and parallelize, (4) allocate on the device, (5) initialize the weights;
and, before any process group starts, check the parallel layout against the model and the run.
The one place a JobConfig is unpacked into the sections each step takes."""

import dataclasses
import functools

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan.config.checks import converters_of
from titan.config.job_config import JobConfig, Model
from titan.converters import apply_converters
from titan.converters.lora import init_adapters
from titan.errors import ConfigError
from titan.models.llama3.args import FLAVORS, ModelArgs
from titan.models.llama3.model import Transformer
from titan.models.llama3.parallelize import (
    check_supported_layout,
    init_as_one_process,
    parallelize_llama,
)
from titan.models.llama3.pipeline import pipeline_llama
from titan.parallelisms.data_parallel import check_cpu_offload
from titan.parallelisms.distributed import fake_mode
from titan.parallelisms.parallel_dims import ParallelDims, resolve_parallel_dims
from titan.parallelisms.pipeline import check_pipeline


def model_args_for(cfg: Model, seq_len: int, tokenizer_words: int) -> ModelArgs:
    """The flavor's args, with the vocabulary override and a RoPE table sized to seq_len."""
    if cfg.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor = {cfg.flavor!r} is not one of {', '.join(FLAVORS)}")
    args = FLAVORS[cfg.flavor]
    vocab = args.vocab_size if cfg.vocab_size == -1 else cfg.vocab_size
    if tokenizer_words > vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_words} tokens but the model's vocabulary is "
            f"{vocab} rows: use the flavor's tokenizer or set model.vocab_size"
        )
    return dataclasses.replace(
        args, vocab_size=vocab, max_seq_len=seq_len, attn_mask_type=cfg.attn_mask_type
    )


def check_layout(
    cfg: JobConfig, args: ModelArgs, device: torch.device, world_size: int
) -> ParallelDims:
    """The parallel layout for this world size, checked against the model and the run before
    any process group starts (titan.parallelisms.parallel_dims.init_parallel starts them)."""
    p = cfg.parallelism
    try:
        dims = resolve_parallel_dims(p, world_size)
        check_supported_layout(dims, args, cfg)
        check_pipeline(p, args.n_layers, cfg.training.local_batch_size, cfg.compile.blocks)
        check_cpu_offload(p.fsdp_cpu_offload, dims.fsdp_enabled)
    except (NotImplementedError, ValueError) as e:
        raise ConfigError(f"[parallelism] {e}") from None
    return dims


@dataclasses.dataclass
class BuiltModel:
    parts: list[Transformer]  # what runs: the whole model, or this rank's pipeline stages
    n_params: int  # of the whole model (tied weights count once), adapters included
    n_trainable: int  # of those, the ones trained (LoRA: the adapters only)
    stage_ids: list[int] | None = None  # the parts' pipeline stage indices
    n_stages: int = 1
    float8_flops: int = 0  # per token, in matmuls on float8 (or MX, NVFP4) tensor cores


def build_model(
    args: ModelArgs,
    dims: ParallelDims,
    meshes: dict[str, DeviceMesh],
    cfg: JobConfig,
    device: torch.device,
    dry_run: bool,
) -> BuiltModel:
    """The model parts this rank runs, allocated and initialized (seeded)."""
    # (1) the model on the meta device: no memory, no init cost
    with torch.device("meta"):
        model = Transformer(args)
    built = BuiltModel([model], n_params=0, n_trainable=0)
    converters = converters_of(cfg)
    try:
        # (2) converters (float8/MX/NVFP4, LoRA): swap linears before any transform shards or splits
        if converters:
            built.float8_flops = apply_converters(model, converters, device, dims.fsdp_enabled)
        built.n_params = sum(p.numel() for p in model.parameters())
        built.n_trainable = _trainable(model)
        # (3) pipeline-split, then parallelize each part: TP, CP, AC, activation offload, compile,
        # FSDP/DDP, in order
        parallelize = functools.partial(
            parallelize_llama, dims=dims, meshes=meshes, p=cfg.parallelism,
            ac=cfg.activation_checkpoint, compile=cfg.compile, converters=converters,
            mixed_precision_param=cfg.training.mixed_precision_param,
        )  # fmt: skip
        if dims.pp > 1:
            built.parts, built.stage_ids, built.n_stages = pipeline_llama(
                model, dims, meshes["pp"], cfg.parallelism, parallelize
            )
        else:
            parallelize(model)
        if built.n_trainable and not any(_trainable(part) for part in built.parts):
            raise ValueError(
                "LoRA: this rank's pipeline stages hold no adapter (lora.target_modules = "
                f"{cfg.lora.target_modules}) and would have nothing to train: give each stage a "
                "block (parallelism.pipeline_parallel_module_names_per_stage)"
            )
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(str(e)) from None
    if dry_run:  # fake tensors: shapes and dtypes, no memory; the values are never read
        with fake_mode():
            for part in built.parts:
                part.to_empty(device=device)
                part.init_buffers(buffer_device=device)
                part.train()
        return built
    # (4) allocate on the device (this rank's shards only); FSDP's CPU offload keeps the shards
    # in host memory, where it needs them before its first gather
    on_host = device if not cfg.parallelism.fsdp_cpu_offload else torch.device("cpu")
    for part in built.parts:
        part.to_empty(device=on_host)
    # (5) initialize the weights (seeded, so every run with this seed starts identically)
    with torch.no_grad():
        if meshes and device.type == "cpu":
            init_as_one_process(built.parts, args, device)
        else:
            # On CUDA, DTensor's RNG gives each shard its own stream of the seeded sequence.
            for part in built.parts:
                part.init_weights(buffer_device=device)
        if converters.lora is not None:
            # init_weights knows no adapters: they start from the seed alone, in any layout
            init_adapters(built.parts, cfg.training.seed)
    for part in built.parts:
        part.train()
    return built


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
