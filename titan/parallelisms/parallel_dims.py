"""Parallel degrees from the [parallelism] table, checked against the world size, and the mesh.

One DeviceMesh holds every dimension, outermost first: pp, dp_replicate, dp_shard, cp, tp (tp
innermost, so a tensor-parallel group is a node's neighbouring ranks). Flattened meshes serve the
parts that span several dimensions: "dp" (data loading, loss and gradient-norm sums),
"dp_shard_cp" (what FSDP shards over) and "dp_cp"; "hsdp" is the 2-D (replicate, shard) mesh.
They are kept by name rather than sliced from the world mesh again (which torch deprecates).
"""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan.config.checks import check_degrees
from titan.config.job_config import Parallelism
from titan.logger import logger
from titan.parallelisms.distributed import init_distributed

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


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

    @property
    def non_data_parallel(self) -> int:
        """Ranks that share one data-parallel rank's batch (tp x cp x pp)."""
        return self.tp * self.cp * self.pp

    @property
    def fsdp_degree(self) -> int:
        """Ranks each parameter is sharded over (FSDP shards over dp_shard x cp; 1: no FSDP)."""
        return self.dp_shard * self.cp

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def ddp_enabled(self) -> bool:
        """Pure replication (DDP): replicas without sharding."""
        return self.dp_replicate > 1 and not self.fsdp_enabled

    def describe(self) -> str:
        degrees = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        sizes = dict(zip(MESH_DIMS, degrees, strict=True))
        parts = [f"{name} {size}" for name, size in sizes.items() if size > 1]
        return " x ".join(parts) if parts else "1 process"

    def build_meshes(self, device_type: str) -> dict[str, DeviceMesh]:
        """The world's mesh ("world"), each dimension's, and the flattened ones, by name;
        call after init_process_group."""
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        meshes = {"world": world, **{name: world[name] for name in MESH_DIMS}}
        meshes["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        # HSDP replicates over dp_replicate and shards over dp_shard x cp (cp ranks hold parts
        # of the same sequences, so they share one replica's shards)
        # (torch 2.13 warns that slicing a flattened dim will be deprecated: only CP x HSDP does)
        shard = "dp_shard_cp" if self.cp > 1 and self.dp_replicate > 1 else "dp_shard"
        meshes["hsdp"] = world["dp_replicate", shard]
        return meshes


def resolve_parallel_dims(cfg: Parallelism, world_size: int) -> ParallelDims:
    """Fill data_parallel_shard_degree = -1 and check the degrees multiply to the world size."""
    others = {
        "data_parallel_replicate_degree": cfg.data_parallel_replicate_degree,
        "tensor_parallel_degree": cfg.tensor_parallel_degree,
        "pipeline_parallel_degree": cfg.pipeline_parallel_degree,
        "context_parallel_degree": cfg.context_parallel_degree,
    }
    check_degrees(cfg)
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


def init_parallel(dims: ParallelDims, device: torch.device) -> dict[str, DeviceMesh]:
    """Start the process group of a checked layout and build its meshes ({} for one process)."""
    init_distributed(device, dims.world_size)
    if dims.world_size == 1:
        return {}
    meshes = dims.build_meshes(device.type)
    logger.info(f"parallel layout: {dims.describe()} over {dims.world_size} ranks")
    return meshes
