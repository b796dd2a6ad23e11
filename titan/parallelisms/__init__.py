"""Parallelism over a DeviceMesh: the layout's degrees and meshes, started by init_parallel
(parallel_dims), the process group and mesh-aware reductions (distributed, with the fake
backend of dry runs), the transforms a model's plan applies in the fixed order TP, CP, AC,
compile, FSDP/DDP (context_parallel, activation_checkpoint, compile, data_parallel; the TP plan
is the model's, built from the helpers in tensor_parallel), and pipeline schedules and their
checks (pipeline). Nothing here knows a model."""
