"""Apply titan's transforms to a Llama 3 model in the one fixed order: TP, AC, compile, FSDP."""

from torch import nn

from titan.config.job_config import JobConfig
from titan.parallelisms.activation_checkpoint import apply_ac
from titan.parallelisms.compile import apply_compile
from titan.parallelisms.parallel_dims import ParallelDims


def parallelize_llama(model: nn.Module, dims: ParallelDims, cfg: JobConfig) -> None:
    """Transform the (meta-device) model in place for the given parallel layout."""
    if dims.world_size > 1:
        raise NotImplementedError(
            "tensor, data, pipeline and context parallel are not implemented yet"
        )
    apply_ac(model, cfg.activation_checkpoint)
    apply_compile(model, cfg.compile)
