"""Parallel degrees from the [parallelism] table, checked against the world size."""

from dataclasses import dataclass

from titan.config.job_config import Parallelism


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int

    @property
    def dp(self) -> int:
        """Ranks that read different data: replicas x shards."""
        return self.dp_replicate * self.dp_shard


def resolve_parallel_dims(cfg: Parallelism, world_size: int) -> ParallelDims:
    """Fill data_parallel_shard_degree = -1 and check the degrees multiply to the world size."""
    others = {
        "data_parallel_replicate_degree": cfg.data_parallel_replicate_degree,
        "tensor_parallel_degree": cfg.tensor_parallel_degree,
        "pipeline_parallel_degree": cfg.pipeline_parallel_degree,
        "context_parallel_degree": cfg.context_parallel_degree,
    }
    product = 1
    for degree in others.values():
        product *= degree
    terms = " x ".join(f"{k} {v}" for k, v in others.items())
    shard = cfg.data_parallel_shard_degree
    if shard == -1:
        if world_size % product:
            raise ValueError(
                f"world size {world_size} is not divisible by {terms} = {product}, so "
                "data_parallel_shard_degree = -1 cannot fill the rest"
            )
        shard = world_size // product
    elif product * shard != world_size:
        raise ValueError(
            f"{terms} x data_parallel_shard_degree {shard} = {product * shard}, "
            f"but the world size is {world_size}: the degrees must multiply to the world size"
        )
    return ParallelDims(
        dp_replicate=cfg.data_parallel_replicate_degree,
        dp_shard=shard,
        tp=cfg.tensor_parallel_degree,
        pp=cfg.pipeline_parallel_degree,
        cp=cfg.context_parallel_degree,
        world_size=world_size,
    )
