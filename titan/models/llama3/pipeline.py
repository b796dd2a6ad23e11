"""Pipeline stages of Llama 3: the split into module names, stage modules, and their union.

A stage is the meta-device Transformer with every module it does not own removed, so each kept
parameter keeps the full model's name and checkpoints do not depend on the pipeline layout.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from titan.config.job_config import Parallelism
from titan.logger import logger
from titan.models.llama3.args import ModelArgs
from titan.models.llama3.model import Transformer
from titan.parallelisms.parallel_dims import ParallelDims
from titan.parallelisms.pipeline import num_stages, rank_stages, stage_log


def split_module_names(args: ModelArgs, cfg: Parallelism, n_stages: int) -> list[list[str]]:
    """Module names of each stage: the explicit lists, or blocks split as evenly as the cost
    of the embedding and output (counted as first/last_stage_less_layers blocks) allows."""
    if cfg.pipeline_parallel_module_names_per_stage:
        names = [entry.split() for entry in cfg.pipeline_parallel_module_names_per_stage]
        check_explicit_split(args, names)
        return names
    first = cfg.pipeline_parallel_first_stage_less_layers
    last = cfg.pipeline_parallel_last_stage_less_layers
    total = args.n_layers + first + last
    # stage s covers cost [bounds[s], bounds[s + 1]); block i sits at cost first + i
    bounds = [round(total * s / n_stages) for s in range(n_stages + 1)]
    stages = []
    for s in range(n_stages):
        blocks = [i for i in range(args.n_layers) if bounds[s] <= first + i < bounds[s + 1]]
        if not blocks:
            raise ValueError(
                f"pipeline stage {s} of {n_stages} gets no block of {args.n_layers} with "
                f"first_stage_less_layers {first} and last_stage_less_layers {last}: lower them "
                "or use fewer stages"
            )
        stages.append([f"layers.{i}" for i in blocks])
    stages[0].insert(0, "tok_embeddings")
    stages[-1] += ["norm", "output"]
    return stages


def check_explicit_split(args: ModelArgs, names: list[list[str]]) -> None:
    """Every module in exactly one stage, blocks in order, embeddings first, output last."""
    known = ["tok_embeddings", *(f"layers.{i}" for i in range(args.n_layers)), "norm", "output"]
    flat = [n for stage in names for n in stage]
    unknown = sorted(set(flat) - set(known))
    if unknown or sorted(flat, key=known.index) != flat or len(set(flat)) != len(flat):
        raise ValueError(
            "parallelism.pipeline_parallel_module_names_per_stage must name each of "
            f"tok_embeddings, layers.0 to layers.{args.n_layers - 1}, norm and output exactly "
            f"once, in model order (unknown: {unknown or 'none'})"
        )
    if len(flat) != len(known):
        raise ValueError(
            "parallelism.pipeline_parallel_module_names_per_stage leaves out "
            f"{sorted(set(known) - set(flat), key=known.index)}: every module needs a stage"
        )
    if any(not stage for stage in names) or "tok_embeddings" not in names[0]:
        raise ValueError(
            "parallelism.pipeline_parallel_module_names_per_stage: every stage needs a module, "
            "and tok_embeddings belongs to the first stage"
        )
    if not {"norm", "output"} <= set(names[-1]):
        raise ValueError(
            "parallelism.pipeline_parallel_module_names_per_stage: norm and output belong to "
            "the last stage"
        )


def stage_module(model: Transformer, names: list[str]) -> Transformer:
    """A copy of the (meta-device) model holding only the modules named."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers):
        if f"layers.{key}" not in names:
            del stage.layers[key]
    for part in ("tok_embeddings", "norm", "output"):
        if part not in names:
            setattr(stage, part, None)
    return stage


class StageUnion(nn.Module):
    """This rank's stages seen as one module with the full model's parameter names, for the
    optimizer, checkpoints, gradient clipping and size reports. It shares the stages'
    submodules and is never called: the pipeline schedule runs the stages."""

    def __init__(self, parts: list[Transformer]):
        super().__init__()
        self.args = parts[0].args
        self.tok_embeddings = next(
            (p.tok_embeddings for p in parts if p.tok_embeddings is not None), None
        )
        blocks = {k: b for p in parts for k, b in p.layers.items()}
        self.layers = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageUnion holds parameters only; run the pipeline schedule")


def pipeline_llama(
    model: Transformer,
    dims: ParallelDims,
    pp_mesh: DeviceMesh,
    p: Parallelism,
    parallelize: Callable[[Transformer], None],
) -> tuple[list[Transformer], list[int], int]:
    """Split the meta-device model into this rank's stages and `parallelize` each one (TP, AC,
    compile, FSDP) as a whole model would be. Returns (stage modules, their stage indices, the
    number of stages)."""
    n_stages = num_stages(p, model.args.n_layers)
    names = split_module_names(model.args, p, n_stages)
    stages = rank_stages(p, n_stages)
    logger.info(f"pipeline: {n_stages} stages over {dims.pp} ranks\n{stage_log(stages, names)}")
    stage_ids = stages[pp_mesh.get_local_rank()]
    parts = [stage_module(model, names[i]) for i in stage_ids]
    for part in parts:
        parallelize(part)
    return parts, stage_ids, n_stages


def static_stage_shapes(
    parts: list[Transformer],
    p: Parallelism,
    seq_len: int,
    tp_mesh: DeviceMesh | None,
    loss_parallel: bool,
) -> list[dict[str, tuple]]:
    """Example (meta) inputs and outputs of each stage and their gradients, so that no stage
    needs a shape exchange with its neighbours at the first step: a dry run's fake collectives
    carry no data, and the neighbours are not there."""
    seq_len = seq_len // p.context_parallel_degree  # this cp rank's part
    mbs = p.pipeline_parallel_microbatch_size
    tp = tp_mesh.size() if tp_mesh is not None else 1
    local_seq = seq_len // tp if p.enable_sequence_parallel and tp > 1 else seq_len
    shapes = []
    for part in parts:
        args = part.args
        params = [x for x in part.parameters() if x.is_floating_point()]
        # activations carry gradients: requires_grad, as the stage's real inputs and outputs do
        meta = {"dtype": _compute_dtype(part, params[0].dtype), "device": "meta"}
        meta["requires_grad"] = True
        hidden = torch.empty(mbs, local_seq, args.dim, **meta)
        if part.tok_embeddings is not None:
            inputs = torch.empty(mbs, seq_len, dtype=torch.long, device="meta")
            input_grads = (None,)
        else:
            inputs, input_grads = hidden, hidden
        if part.output is None:
            output = hidden
        elif loss_parallel:
            local = torch.empty(mbs, seq_len, args.vocab_size // tp, **meta)
            output = DTensor.from_local(local, tp_mesh, [Shard(-1)], run_check=False)
            output = output.detach().requires_grad_()
        else:
            output = torch.empty(mbs, seq_len, args.vocab_size, **meta)
        shapes.append({
            "input_args": inputs, "output_args": output, "input_grads": input_grads,
            "output_grads": output,
        })  # fmt: skip
    return shapes


def _compute_dtype(part: nn.Module, storage: torch.dtype) -> torch.dtype:
    """The dtype activations flow in: FSDP's param_dtype where FSDP casts, else the storage's."""
    if isinstance(part, FSDPModule):
        policy = part._get_fsdp_state()._mp_policy
        return policy.param_dtype or storage
    return storage
