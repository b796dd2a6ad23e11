"""Checkpoints: DCP folders written atomically and read under any layout (dcp_io), and the
run's checkpointer, which saves the model, optimizer, LR schedule, dataloader and step, keeps
the newest k and resumes exactly (checkpointer)."""
