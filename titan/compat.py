"""What titan needs from torch and torchao that differs across the versions it runs on (torch 2.11
to 2.15), and the list of their private APIs titan uses, each with the versions checked.

A difference is decided by what the installed torch has (a name, a parameter), not by its
version string, wherever a feature test exists. `scripts/check_torch_versions.sh` builds an
environment per torch version and runs the tests that touch every name below.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.pipelining import PipelineStage


@dataclass(frozen=True)
class PrivateApi:
    name: str  # dotted path: modules, then attributes
    used_in: str  # the titan module that uses it, and for what
    since: str = ""  # the first torch that has it, where titan does without it on older ones
    before: str = ""  # the first torch without it, where titan does without it from then on


# Every private torch / torchao name titan reaches for, checked on torch 2.13.0 (the suite) and
# 2.11.0, 2.14.1, 2.15.0 (scripts/check_torch_versions.sh): tests/test_compat.py resolves each
# one on the installed versions, and checks that titan's code names no private torch or
# torchao module, function or class missing here (private attributes of objects, such as a
# schedule's _load_csv or FSDP's _get_fsdp_state, are listed by hand).
PRIVATE_APIS = (
    PrivateApi("torch._C._current_graph_task_id", "memory_tracer: is autograd running"),
    PrivateApi("torch._C._distributed_c10d._dump_fr_trace", "watchdog: collectives in flight"),
    # and torch._C._distributed_c10d._dump_nccl_trace, NCCL's recorder: read with getattr by the
    # watchdog where present (CUDA builds only, so not resolvable in the CPU suite)
    PrivateApi("torch._foreach_mul_", "distributed: clipping in one kernel per device"),
    PrivateApi("torch._foreach_norm", "distributed: the gradient norm"),
    PrivateApi("torch._functorch.config.activation_memory_budget", "activation_checkpoint"),
    PrivateApi("torch._guards.active_fake_mode", "memory_tracer"),
    PrivateApi("torch._inductor.config._micro_pipeline_tp", "tensor_parallel: async TP"),
    PrivateApi("torch._subclasses.fake_tensor.FakeTensor", "memory_tracer, dry_run"),
    PrivateApi("torch._subclasses.fake_tensor.FakeTensorMode", "distributed"),
    PrivateApi("torch._subclasses.fake_tensor.unset_fake_temporarily", "trainer"),
    PrivateApi("torch.cuda.memory._record_memory_history", "profiling: memory snapshots"),
    PrivateApi("torch.cuda.memory._snapshot", "profiling: memory snapshots"),
    PrivateApi("torch.distributed._composable.replicate.replicate", "data_parallel: DDP"),
    PrivateApi("torch.distributed._functional_collectives.AsyncCollectiveTensor", "float8_stats"),
    PrivateApi("torch.distributed._functional_collectives.all_gather_tensor_autograd", "here"),
    PrivateApi(
        "torch.distributed._functional_collectives.all_gather_single_autograd",
        "here: context parallel's key gather",
        since="2.13",
    ),
    PrivateApi("torch.distributed._symmetric_memory.enable_symm_mem_for_group", "async TP"),
    PrivateApi("torch.distributed._tools.fake_collectives", "distributed: fake collectives"),
    PrivateApi(
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper",
        "activation_checkpoint",
    ),
    PrivateApi("torch.distributed.fsdp.FSDPModule._get_fsdp_state", "memory_tracer, pipeline"),
    PrivateApi("torch.distributed.pipelining._utils.InferenceMode", "here", since="2.12"),
    # undocumented, not underscored: every schedule calls it with last_backward (2.11 to 2.15),
    # and the stage's FSDP handling applies only to an FSDPModule submodule (both read in
    # stage.py of 2.13 and 2.15)
    PrivateApi(
        "torch.distributed.pipelining.PipelineStage.backward_one_chunk",
        "pipeline: FSDP's reduce-scatter per micro-batch (pipeline_parallel_grad_reduce)",
    ),
    PrivateApi("torch.distributed.pipelining.schedules._Action", "pipeline: CSV schedules"),
    PrivateApi(
        "torch.distributed.pipelining.schedules._PipelineScheduleRuntime._load_csv",
        "pipeline: CSV schedules",
    ),
    PrivateApi(
        "torch.distributed.pipelining.schedules.PipelineScheduleMulti._warmup_p2p",
        "here: dry runs' static shapes on 2.12 and 2.13",
        since="2.12",
        before="2.15",
    ),
    PrivateApi("torch.distributed.tensor._dispatch.is_pinned_handler", "here: MX", since="2.12"),
    PrivateApi(
        "torch.distributed.tensor._ops.scaled_mm_single_dim_strategy", "here: MX", since="2.12"
    ),
    PrivateApi(
        "torch.distributed.tensor._sharding_prop.ShardingPropagator", "memory_tracer: placeholders"
    ),
    PrivateApi(
        "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
        "hf_load: the block of a tensor a rank holds (FSDP x TP's nested shards too)",
    ),
    PrivateApi(
        "torch.distributed.tensor.experimental._context_parallel._attention."
        "_templated_ring_attention",
        "context_parallel: ring attention",
    ),
    PrivateApi(
        "torch.distributed.tensor.experimental._context_parallel._attention."
        "_templated_ring_attention_backward",
        "context_parallel",
    ),
    PrivateApi(
        "torch.distributed.tensor.experimental._context_parallel._attention._cp_options",
        "context_parallel: load balance",
    ),
    PrivateApi(
        "torch.distributed.tensor.experimental._context_parallel._attention.set_rotate_method",
        "context_parallel",
    ),
    PrivateApi("torch.optim._muon._adjust_lr", "muon: Muon's LR by matrix shape", since="2.9"),
    PrivateApi(
        "torch.optim._muon._zeropower_via_newtonschulz",
        "muon: Newton-Schulz on a gathered matrix",
        since="2.9",
    ),
    PrivateApi("torch.testing._internal.distributed.fake_pg.FakeStore", "distributed: dry runs"),
    PrivateApi(
        "torch.utils._python_dispatch.TorchDispatchMode",
        "memory_tracer; dry_run: counting FSDP's reduce-scatters",
    ),
    PrivateApi(
        "torch.utils._python_dispatch.is_traceable_wrapper_subclass", "memory_tracer, offload"
    ),
    PrivateApi("torch.utils._pytree.tree_flatten", "memory_tracer"),
    PrivateApi("torchao.float8._auto_filter_for_recipe", "float8: filter_fqns = ['auto_filter']"),
    PrivateApi(
        "torchao.prototype.moe_training.tensor.MXFP8TrainingWeightWrapperTensor", "mx (prototype)"
    ),
)


# --- context parallel: the differentiable all-gather -------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch < 2.13's all-gather backward
    hands its gradient to a reduce-scatter that needs contiguous input (2.13+ copy it there)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GATHER_SINGLE = getattr(funcol, "all_gather_single_autograd", None)  # torch >= 2.13


def all_gather_autograd(x: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    """All-gather along gather_dim over group; the backward reduce-scatters the gradient. torch
    2.13 renamed the op (the old name warns there, and is all that 2.11 and 2.12 have)."""
    if _GATHER_SINGLE is not None:
        return _GATHER_SINGLE(x, gather_dim=gather_dim, group=group)
    full = funcol.all_gather_tensor_autograd(x, gather_dim=gather_dim, group=group)
    return _ContiguousGrad.apply(full)


def compiled_ring_attention_unsupported() -> str | None:
    """Why compiled blocks cannot run context parallel's ring attention on the installed torch,
    or None: torch 2.11's compile loses the gradient through it (an autograd.Function around
    torch's ring loop; measured zero gradients into q, k and v, no error), 2.12+ are right, and
    titan compiles whole blocks (fullgraph) rather than breaking the graph around it."""
    if torch_at_least("2.12"):
        return None
    return f"needs torch 2.12 or newer (installed: {torch.__version__})"


# --- pipeline parallel ----------------------------------------------------------------------

_STAGE_PARAMS = inspect.signature(PipelineStage.__init__).parameters


def stage_metadata(shapes: dict) -> dict:
    """A stage's static metadata as the installed PipelineStage takes it: torch 2.11 takes the
    inputs and outputs only (it needs no gradient metadata: it never votes on shapes)."""
    return {k: v for k, v in shapes.items() if k in _STAGE_PARAMS}


def decide_static_shapes_on_fake_backend(schedule) -> None:
    """Dry runs give every stage static shapes and run on the fake process group, whose
    point-to-point messages carry nothing. torch 2.14+ then decide the stages' metadata mode
    (static) without asking the neighbours, and 2.11 never asks; torch 2.12 and 2.13 let the
    stages vote over point-to-point messages, read zeros and choose dynamic inference, which then
    waits for shapes nobody sends. On those two this does what 2.14+ do."""
    if not hasattr(schedule, "_warmup_p2p") or torch_at_least("2.14"):
        return
    from torch.distributed.pipelining._utils import InferenceMode

    vote = schedule._warmup_p2p

    def warmup(stages, has_backward, p2p_done):
        if any(dist.get_backend(stage.group) == "fake" for stage in stages):
            for stage in stages:
                stage._inference_mode = InferenceMode.STATIC
            return
        vote(stages, has_backward, p2p_done)

    schedule._warmup_p2p = warmup


# --- optimizers -------------------------------------------------------------------------------


def muon_unsupported() -> str | None:
    """Why optimizer.name = "Muon" cannot run on the installed torch, or None: titan's Muon is
    torch.optim.Muon's update (torch 2.9 and newer; the same signatures on 2.11 to 2.15)."""
    if hasattr(torch.optim, "Muon"):
        return None
    return f"needs torch.optim.Muon, torch 2.9 or newer (installed: {torch.__version__})"


def torch_at_least(version: str) -> bool:
    """Whether the installed torch is `version` or newer (a local build of it counts)."""
    return torch.torch_version.TorchVersion(torch.__version__) >= version


# --- low precision ----------------------------------------------------------------------------


def nvfp4_training_unsupported() -> str | None:
    """Why torchao lacks the NVFP4 training pieces titan's nvfp4 converter calls (its kernels'
    linear and the Hadamard matrix), or None when it has them (torchao 0.18 has)."""
    try:
        from torchao.prototype.moe_training.nvfp4_training import hadamard_utils, nvfp4_linear

        hadamard_utils.get_rht_matrix, nvfp4_linear.nvfp4_linear  # noqa: B018
    except (ImportError, AttributeError):
        import torchao

        return f"is missing from torchao {torchao.__version__} (titan's is checked with 0.18)"
    return None


def mx_training_unsupported() -> str | None:
    """Why torchao's MXFP8 training cannot run on the installed torch, or None when it can: its
    weight tensor needs DTensor's single-dim scaled_mm strategy and pinned handlers (torch 2.12+),
    and torchao 0.17+."""
    from torch.distributed.tensor import _dispatch, _ops

    if not hasattr(_ops, "scaled_mm_single_dim_strategy") or not hasattr(
        _dispatch, "is_pinned_handler"
    ):
        return f"needs torch 2.12 or newer (installed: {torch.__version__})"
    try:
        from torchao.prototype.moe_training import tensor

        tensor.MXFP8TrainingWeightWrapperTensor  # noqa: B018
    except (ImportError, AttributeError):
        import torchao

        return f"needs torchao 0.17 or newer (installed: {torchao.__version__})"
    return None
