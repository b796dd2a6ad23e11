"""Parallelism transforms applied to a built model over a DeviceMesh."""
