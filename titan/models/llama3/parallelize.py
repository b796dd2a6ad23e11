"""Apply titan's transforms to a Llama 3 model in the one fixed order: TP, CP, AC, activation
offload, compile, FSDP/DDP.

The tensor-parallel plan is keyed by Meta's layer names. With sequence parallel the residual
stream between blocks is sharded on the sequence dimension (Shard(1)); attention and the FFN
gather it (all-gather) and give back a sequence shard (reduce-scatter). `init_as_one_process`
gives a parallelized CPU model the weights a one-process run would start from.
"""

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan.compat import compiled_ring_attention_unsupported
from titan.config.checks import Converters, converters_of
from titan.config.job_config import ActivationCheckpoint, Compile, JobConfig, Parallelism
from titan.converters.float8 import float8_tp_enabled, float8_tp_styles
from titan.converters.lora import apply_lora_tp, is_adapter_key
from titan.models.llama3.args import ModelArgs
from titan.models.llama3.model import Transformer
from titan.parallelisms.activation_checkpoint import apply_ac
from titan.parallelisms.compile import apply_compile
from titan.parallelisms.context_parallel import apply_cp, check_cp
from titan.parallelisms.data_parallel import apply_ddp, apply_fsdp
from titan.parallelisms.distributed import comm_mode
from titan.parallelisms.offload import apply_activation_offload, check_activation_offload
from titan.parallelisms.parallel_dims import ParallelDims
from titan.parallelisms.tensor_parallel import (
    VocabParallelEmbedding,
    detach_async_collective_output,
    enable_async_tp,
    replicate_module,
)


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """Every rank must hold whole heads (query and key/value) and equal FFN slices."""
    for what, size in (
        ("n_heads", args.n_heads),
        ("n_kv_heads", args.n_kv_heads),
        ("ffn_hidden_dim", args.ffn_hidden_dim),
        ("vocab_size", args.vocab_size),
    ):
        if size % tp:
            raise ValueError(
                f"parallelism.tensor_parallel_degree = {tp} does not divide the model's {what} "
                f"= {size}: use a tensor_parallel_degree that divides it"
            )


def check_transforms(
    dims: ParallelDims, ac: ActivationCheckpoint, compile_blocks: bool, converters: Converters
) -> None:
    """Stop on combinations of the transforms parallelize_llama applies that it cannot apply."""
    plain_ac = ac.mode == "full" or (ac.mode == "selective" and ac.selective_ac_option != "op")
    if dims.tp > 1 and compile_blocks and plain_ac:
        # torch 2.13's AOT autograd fails on a compiled checkpoint of DTensor code that saves
        # no op outputs ("expected all tensors_saved_with_vc_check to be Tensors, got
        # DeviceMesh"); op-level selective AC saves matmul outputs and compiles correctly.
        raise ValueError(
            f"activation_checkpoint.mode = {ac.mode!r} (whole blocks) with compile and tensor "
            "parallel fails inside torch.compile: use mode = 'selective' with "
            "selective_ac_option = 'op', or compile only the loss (compile.components = "
            "['loss']), or turn compile off"
        )
    check_activation_offload(ac.offload, ac, compile_blocks)
    if dims.tp > 1 and converters.mx is not None:
        # measured on torch 2.13 / torchao 0.18: the TP-sharded matmuls of MXFP8 training
        # weights dispatch as plain matmuls, so TP x mx silently trains in high precision
        raise ValueError(
            "model.converters = ['mx'] with tensor parallel: torchao's MXFP8 training weights "
            "lose their MX matmuls once TP shards them; use the float8 converter with TP, or "
            "tensor_parallel_degree = 1"
        )


def check_supported_layout(dims: ParallelDims, args: ModelArgs, cfg: JobConfig) -> None:
    """Stop on layouts this plan cannot apply, before any process starts: a check across the
    layout, the model and the run's sections, so it takes the whole config."""
    if dims.tp > 1:
        check_tp_degree(args, dims.tp)
    check_transforms(dims, cfg.activation_checkpoint, cfg.compile.blocks, converters_of(cfg))
    if dims.cp > 1 and cfg.compile.blocks and args.attn_mask_type == "causal":
        if why := compiled_ring_attention_unsupported():
            raise ValueError(
                f"context parallel with causal attention in compiled blocks {why}: torch 2.11's "
                "compile loses the ring attention's gradient; upgrade torch, use "
                "model.attn_mask_type = 'block_causal', or compile only the loss"
            )
    if dims.cp > 1:
        p, t = cfg.parallelism, cfg.training
        on_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        on_cuda = on_cuda or comm_mode() == "fake_backend"  # a dry run checks the GPU run
        cuda_dtype = getattr(torch, t.mixed_precision_param) if on_cuda else None
        check_cp(
            dims.cp, dims.tp, p.enable_sequence_parallel, t.seq_len, args.attn_mask_type,
            p.context_parallel_rotate_method, cuda_dtype,
        )  # fmt: skip
    if dims.pp > 1 and args.tie_word_embeddings:
        raise ValueError(
            "pipeline parallel with tied embeddings (Llama 3.2 1B/3B): the embedding and the "
            "output would live on different stages; use FSDP/TP for these models "
            "(pipeline_parallel_degree = 1)"
        )
    if dims.pp > 1 and dims.ddp_enabled:
        raise ValueError(
            "pipeline parallel with DDP (data_parallel_replicate_degree > 1 without sharding) is "
            "not supported: shard too (FSDP, or HSDP with data_parallel_shard_degree > 1)"
        )


def apply_tp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
    float8: bool = False,
) -> None:
    """Shard the Llama 3 matmuls over `mesh` (Megatron-style: colwise in, rowwise out); with
    `float8`, float8 layers take torchao's TP styles, which all-gather activations in float8."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan = {
        # vocab-sharded embedding (its gradient formed on the rank's rows only); its output is
        # reduce-scattered onto sequence shards
        "tok_embeddings": VocabParallelEmbedding(output_layouts=seq),
        # logits sharded on the vocabulary for the loss-parallel cross-entropy
        "output": ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    # a pipeline stage holds only some of these
    parallelize_module(
        model, mesh, {k: v for k, v in plan.items() if getattr(model, k) is not None}
    )
    norms = [model.norm] if model.norm is not None else []
    for block in model.layers.values():
        colwise, rowwise, prepare = float8_tp_styles(block) if float8 else _PLAIN_STYLES
        attention = ["attention.wq", "attention.wk", "attention.wv"]
        ffn_in = ["feed_forward.w1", "feed_forward.w3"]
        plan = {
            # (x, rope, mask): x is gathered, the RoPE table and the mask are whole already
            "attention": prepare(
                attention,
                input_layouts=(seq, None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            **{fqn: colwise(fqn) for fqn in attention},
            "attention.wo": rowwise("attention.wo", output_layouts=seq),
            "feed_forward": prepare(
                ffn_in, input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            ),
            **{fqn: colwise(fqn) for fqn in ffn_in},
            "feed_forward.w2": rowwise("feed_forward.w2", output_layouts=seq),
        }
        parallelize_module(block, mesh, plan)
        norms += [block.attention_norm, block.ffn_norm]
    for norm in norms:
        if sequence_parallel:
            parallelize_module(norm, mesh, SequenceParallel())  # norms act on sequence shards
        else:
            replicate_module(norm, mesh)
    if model.args.tie_word_embeddings:
        # parallelize_module gave tok_embeddings and output separate DTensor parameters: re-tie.
        # Embedding rows and output columns are both sharded on the vocabulary (Shard(0)).
        model.output.weight = model.tok_embeddings.weight


_PLAIN_STYLES = (
    lambda _fqn, **kw: ColwiseParallel(**kw),
    lambda _fqn, **kw: RowwiseParallel(**kw),
    lambda _fqns, **kw: PrepareModuleInput(**kw),
)


def parallelize_llama(
    model: nn.Module,
    dims: ParallelDims,
    meshes: dict[str, DeviceMesh],
    p: Parallelism,
    ac: ActivationCheckpoint,
    compile: Compile,
    converters: Converters,
    mixed_precision_param: str,
) -> None:
    """Transform the (meta-device) model in place for the given parallel layout (`meshes`:
    ParallelDims.build_meshes, empty for one process)."""
    check_transforms(dims, ac, compile.blocks, converters)
    compile_blocks = compile.blocks
    if dims.tp > 1:
        float8 = float8_tp_enabled(converters.float8, meshes["tp"])
        apply_tp(
            model, meshes["tp"], sequence_parallel=p.enable_sequence_parallel,
            loss_parallel=not p.disable_loss_parallel, float8=float8,
        )  # fmt: skip
        apply_lora_tp(model)  # the TP styles shard a linear's adapters as its weight: re-place
        if p.enable_async_tensor_parallel:
            enable_async_tp(meshes["tp"], compile.enable)
        if compile_blocks and model.tok_embeddings is not None:
            detach_async_collective_output(model.tok_embeddings)
    if dims.cp > 1:
        apply_cp(model, meshes["cp"], model.args.attn_mask_type, p.context_parallel_rotate_method)
    apply_ac(model, ac)
    apply_activation_offload(model, ac.offload)  # the blocks AC did not wrap
    apply_compile(model, compile)
    if dims.fsdp_enabled:
        # HSDP: shard within each replica, all-reduce gradients across replicas
        fsdp_mesh = meshes["hsdp"] if dims.dp_replicate > 1 else meshes["dp_shard_cp"]
        # a dry run traces the GPU run: bf16 gathers
        on_gpu = fsdp_mesh.device_type == "cuda" or comm_mode() == "fake_backend"
        param_dtype = torch.float32
        if on_gpu and mixed_precision_param == "bfloat16":
            param_dtype = torch.bfloat16
        reshard = p.fsdp_reshard_after_forward
        if dims.pp > 1 and reshard == "default":
            # a pipeline stage runs forward once per micro-batch: keep its blocks gathered
            # rather than all-gather them again for every micro-batch
            reshard = "never"
        apply_fsdp(
            model, fsdp_mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
            reshard_after_forward=reshard, cpu_offload=p.fsdp_cpu_offload,
        )  # fmt: skip
    elif dims.ddp_enabled:
        if dims.tp > 1:
            raise NotImplementedError(
                "DDP x tensor parallel is not supported: use FSDP (data_parallel_shard_degree "
                "> 1) or HSDP with tensor parallel"
            )
        apply_ddp(model, meshes["dp_replicate"])


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules with `dtype` parameters (e.g. on the meta device)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_as_one_process(parts: list[nn.Module], args: ModelArgs, device: torch.device) -> None:
    """Give parallelized model parts (one, or this rank's pipeline stages) exactly the weights a
    one-process run with this seed has.

    DTensor's random ops on CPU draw the same numbers on every rank, so shards initialized in
    place would repeat each other. On CPU (small models) each rank builds the full model and
    keeps its own pieces instead: every layout then starts from identical weights.
    """
    with torch.device("meta"):
        full = Transformer(args)
    full.to_empty(device=device)
    full.init_weights(buffer_device=device)
    weights = full.state_dict()
    # LoRA adapters are not in `full`: lora.init_adapters fills them afterwards
    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in parts:
        keys = get_model_state_dict(part).keys()  # a pipeline stage holds some of the modules
        missing = [k for k in keys if k not in weights and not is_adapter_key(k)]
        assert not missing, f"init_as_one_process: {missing} are not in the model"
        state = {k: weights[k] for k in keys if k in weights}
        set_model_state_dict(part, state, options=options)
        part.rope_cache = full.rope_cache  # a non-persistent buffer: not in the state dict
