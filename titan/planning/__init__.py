"""Offline layout planning for `titan-plan`: the parameter, memory and step-time models of a
flavor on N GPUs (model_sizes, schedule_memory, memory_model, throughput_model) and the
planner that ranks the layouts titan accepts (planner, plan_config). Nothing in a training run
imports it; it reads the model's and the trainer's own formulas and checks."""
