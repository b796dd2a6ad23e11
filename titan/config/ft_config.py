"""The [fault_tolerance] section (torchft replica groups), kept apart from job_config.py, which
imports it into the one schema (JobConfig)."""

from dataclasses import dataclass


@dataclass
class FaultTolerance:
    enable: bool = False
    """Per-step fault tolerance with torchft: each replica group is its own run_train.sh job
    (its own torchrun, FSDP/TP/CP/PP inside it), the groups average gradients over the replicas
    present in each step's quorum, and a restarted group heals from a live peer
    (scripts/torchft_local.sh starts a lighthouse and the groups on one machine)."""
    replica_group: int = 0
    """This group's id, 0 .. replica_groups - 1: it reads slice replica_group of every global
    batch (as dp_replicate rank replica_group of an HSDP run would)."""
    replica_groups: int = 1
    """Replica groups of the run (the replica dimension, HSDP's dp_replicate): the global batch
    is cut into this many x the group's dp degree slices, present or not."""
    lighthouse: str = ""
    """The torchft lighthouse's address (http://host:29510); empty: the TORCHFT_LIGHTHOUSE
    environment variable."""
    min_replicas: int = 1
    """A step commits only when at least this many groups are in its quorum."""
    process_group: str = "gloo"
    """Backend of the gradient all-reduce across groups: gloo (CPU tensors, tests) or nccl."""
    timeout_s: int = 60
    """A collective across groups, a commit vote or a heal that takes longer fails the step
    (which is then redone by the groups that remain)."""
    quorum_timeout_s: int = 300
    """How long a group waits for a quorum of at least min_replicas groups."""
