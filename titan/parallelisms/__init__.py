"""Parallelism over a DeviceMesh: the layout's degrees and meshes, started by init_parallel
(parallel_dims), the process group and mesh-aware reductions (distributed, with the fake
backend of dry runs), and one transform per parallelism, each applied to a built model in the
fixed order TP, CP, AC, compile, FSDP/DDP (tensor_parallel, context_parallel,
activation_checkpoint, compile, data_parallel), and pipeline schedules (pipeline)."""
