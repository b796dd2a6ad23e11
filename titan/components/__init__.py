"""Trainer components: tokenizer, data, optimizer, LR schedule, metrics, profiling."""
