"""Running training: the Trainer (trainer) and the parts of its step (loss, optimizer and LR
schedule, metrics, profiling, runtime: device, determinism, accumulation), validation
(validate), and the dry run (dry_run, memory_tracer), which drives the same Trainer on the
fake backend and traces a step's memory."""
