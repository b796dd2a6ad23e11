"""Tensor-parallel helpers shared by model plans: replicated modules, async TP, compile guard."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module


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
