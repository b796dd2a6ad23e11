"""Tensor-parallel helpers shared by model plans: the vocabulary-parallel embedding, replicated
modules, async TP, compile guard."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle


class VocabParallelEmbedding(ParallelStyle):
    """An nn.Embedding sharded on its vocabulary (rows) over the TP mesh, taking whole token ids
    and giving `output_layouts` (a sequence shard under sequence parallel).

    torch's RowwiseParallel runs aten.embedding on the DTensor weight, and DTensor's embedding
    backward (torch 2.11-2.15) then forms a replicated, full-vocabulary gradient on every rank:
    vocab x dim in fp32 (8.4 GB for 405B) where the rank's shard is an eighth of it. Here each
    rank looks its own rows up (ids outside them give zeros), so autograd forms the gradient of
    those rows only, and the partial outputs are summed into `output_layouts`."""

    def __init__(self, output_layouts: Placement, use_local_output: bool = True):
        super().__init__()
        self.output_layouts = output_layouts
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding shards an nn.Embedding, not {type(module)}")
        weight = distribute_tensor(module.weight, device_mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(weight))
        module.forward = lambda ids: self._lookup(module.weight, ids)
        return module

    def _lookup(self, weight: DTensor, ids: torch.Tensor) -> torch.Tensor:
        mesh = weight.device_mesh  # FSDP's unsharded parameter: the TP mesh only
        local = weight.to_local()
        # Shard(0) splits rows as torch.chunk does: ceil(vocab / tp) rows per rank
        start = mesh.get_local_rank() * -(-weight.shape[0] // mesh.size())
        outside = (ids < start) | (ids >= start + local.shape[0])
        out = F.embedding((ids - start).masked_fill(outside, 0), local)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        out = DTensor.from_local(out, mesh, [Partial()], run_check=False)
        out = out.redistribute(mesh, [self.output_layouts])
        return out.to_local() if self.use_local_output else out


def replicate_module(module: nn.Module, mesh: DeviceMesh) -> None:
    """Make a module's parameters replicated DTensors while it takes and returns plain tensors.

    Without sequence parallel the norms run on full, replicated activations; their weights must
    still be DTensors so that the optimizer and gradient clipping see one tensor type.
    """

    def to_dtensor(_module, inputs, device_mesh):
        return tuple(
            DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def to_local(_module, output, _device_mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)


def enable_async_tp(mesh: DeviceMesh, compile_enabled: bool) -> None:
    """Overlap TP collectives with matmuls: inductor's micro-pipeline TP on symmetric memory."""
    if mesh.device_type != "cuda":
        raise ValueError(
            "parallelism.enable_async_tensor_parallel needs CUDA (symmetric memory); "
            f"this run's device is {mesh.device_type}: turn it off"
        )
    if not compile_enabled:
        raise ValueError(
            "parallelism.enable_async_tensor_parallel works through torch.compile: "
            "set compile.enable = true"
        )
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(mesh.get_group().group_name)


def detach_async_collective_output(module: nn.Module) -> None:
    """Make `module`'s output a plain tensor before it enters a compiled block.

    Under TP the embedding's output is an AsyncCollectiveTensor (a pending all-gather or
    reduce-scatter). Passed into a compiled block its gradient is dropped, silently breaking
    the embedding's gradient; cloning in eager mode waits for the collective and gives the
    compiled code an ordinary tensor.
    """
    module.register_forward_hook(lambda _m, _inputs, output: output.clone())
