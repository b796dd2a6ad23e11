"""torchft replica groups: each group is its own job; per step the groups agree on a quorum
through the lighthouse, sum target counts, losses and gradients over the groups present, and
commit the optimizer step only when the quorum says so. A group behind the quorum's step heals
from a live peer (torchft's HTTP checkpoint transport, rank r of one group to rank r of another).

`ReplicaGroups` wraps torchft's Manager for titan; `data_slot` is where a group's ranks read in
the global batch. torchft is imported only when [fault_tolerance] is enabled.
"""

import os
import socket
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from titan.config.job_config import FaultTolerance
from titan.errors import ConfigError
from titan.logger import logger

# gradients are summed across groups in flat buckets of at most this many elements (a bucket
# is one extra copy of that many gradient values in memory)
BUCKET_ELEMENTS = 25 * 2**20


def data_slot(ft: FaultTolerance, dp_rank: int, dp_degree: int) -> tuple[int, int]:
    """(data rank, data degree) of a rank of group `ft.replica_group`: the ranks of all groups
    read the global batch as the dp ranks of one HSDP run with dp_replicate = replica_groups
    (group g's dp rank r is HSDP's dp rank g x dp_degree + r)."""
    if not ft.enable:
        return dp_rank, dp_degree
    return ft.replica_group * dp_degree + dp_rank, ft.replica_groups * dp_degree


def _torchft():
    try:
        import torchft
    except ImportError:
        raise ConfigError(
            "fault_tolerance.enable needs torchft: pip install 'titan[ft]' (torchft 0.2, which "
            "also brings the lighthouse, torchft_lighthouse)"
        ) from None
    return torchft


class ReplicaGroups:
    """This group's torchft Manager and the cross-group sums titan's step needs.

    `state_dict` / `load_state_dict`: the trainer's state that a healing group takes from a live
    peer (called by torchft: the first in its quorum thread, the second in start_quorum)."""

    def __init__(
        self,
        ft: FaultTolerance,
        device: torch.device,
        state_dict: Callable[[], dict[str, Any]],
        load_state_dict: Callable[[dict[str, Any]], None],
        step: int,
    ):
        torchft = _torchft()
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        self.cfg, self.device = ft, device
        timeout = timedelta(seconds=ft.timeout_s)
        pg = ProcessGroupGloo(timeout) if ft.process_group == "gloo" else ProcessGroupNCCL(timeout)
        if not (ft.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
            raise ConfigError(
                "fault_tolerance.enable: name the lighthouse with --fault_tolerance.lighthouse "
                "http://HOST:29510 or TORCHFT_LIGHTHOUSE (scripts/torchft_local.sh starts one)"
            )
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.group_world = world
        store_addr, store_port, self._store = self._group_store(world)
        self.manager = torchft.Manager(
            pg=pg,
            load_state_dict=load_state_dict,
            state_dict=state_dict,
            min_replica_size=ft.min_replicas,
            # synchronous quorum: a healing group loads its peer's state before its forward and
            # takes part in that very step (an async quorum overlaps the quorum with the forward
            # but drops the healing group's batch slice for one more step)
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timedelta(seconds=ft.quorum_timeout_s),
            rank=rank,
            world_size=world,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=ft.lighthouse or None,
            # torchft takes the group's number from the id's trailing digits
            replica_id=f"titan_group_{ft.replica_group}",
            # titan builds identical weights from training.seed in every group; torchft's step-0
            # sync would make every group but one heal (and sit out) at step 1
            init_sync=False,
        )
        # a resumed group's committed steps: the lighthouse compares them to pick who heals
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        self.members: list[int] = []  # the groups in this step's quorum

    @staticmethod
    def _group_store(world: int) -> tuple[str, int, Any]:
        """(address, port, store): the group's TCPStore that torchft's Manager joins. torchrun
        serves one at MASTER_ADDR:MASTER_PORT; one process without a process group starts its
        own."""
        host = os.environ.get("MASTER_ADDR", "localhost")
        if host in ("localhost", "127.0.0.1", "::1"):
            # other groups connect to this address (the quorum's store can be any group's):
            # on one node run_train.sh says localhost, which means nothing on another machine
            host = socket.gethostname()
        if world > 1 or dist.is_initialized():
            return host, int(os.environ["MASTER_PORT"]), None
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        return host, store.port, store

    def start_step(self) -> None:
        """Join this step's quorum; a group behind it heals here (before its data is read)."""
        self.manager.start_quorum()

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the groups of the quorum, in place (garbage on an error, which then
        fails the step's commit)."""
        self.manager.allreduce(t, reduce_op=dist.ReduceOp.SUM).wait()
        return t

    def sum_targets(self, group_targets: float) -> float:
        """The step's target count over the groups in the quorum (each group's own count: its
        data-parallel sum); also records which groups those are, and checks that they run as
        many ranks as this one, in one all-reduce (each group writes its world size in its slot)."""
        n, world = self.cfg.replica_groups, self.group_world
        t = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        t[0], t[1 + self.cfg.replica_group] = group_targets, float(world)
        t = self._sum(t).cpu()
        if self.errored() is not None:  # a peer failed: the sums are partial, and the
            return float(t[0])  # step will not commit (it is redone); keep the last members
        members = [g for g in range(n) if t[1 + g] > 0.5]
        sizes = {g: int(t[1 + g]) for g in members}
        if any(size != world for size in sizes.values()):
            # rank r of each group forms one torchft process group: the layouts must match
            raise ConfigError(
                f"torchft replica groups run different numbers of ranks ({sizes}): start every "
                "group with the same NGPU and parallel degrees"
            )
        if members != self.members and members:
            logger.info(f"torchft: groups {members} of {n} in the quorum")
        self.members = members
        return float(t[0])

    def sum_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss (each group holds its share of the global mean) over the groups."""
        return self._sum(loss.detach().to(torch.float32).clone().reshape(1)).reshape(())

    def sum_grads(self, grads: Iterable[torch.Tensor]) -> None:
        """Sum the (local shards of) gradients over the groups, in buckets of one dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            bucket, size = [], 0
            for g in same + [None]:
                if g is not None and (size + g.numel() <= BUCKET_ELEMENTS or not bucket):
                    bucket.append(g)
                    size += g.numel()
                    continue
                flat = self._sum(torch.cat([x.reshape(-1) for x in bucket]))
                for x, part in zip(bucket, flat.split([x.numel() for x in bucket]), strict=True):
                    x.copy_(part.view_as(x))
                bucket, size = ([g], g.numel()) if g is not None else ([], 0)

    def should_commit(self) -> bool:
        """The quorum's vote on this step's update (after its last collective across groups)."""
        return self.manager.should_commit()

    def errored(self) -> Exception | None:
        """The error of this step's cross-group work, if any (the step will not commit)."""
        return self.manager.errored()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


class TracedGroups(ReplicaGroups):
    """What a dry run runs in place of ReplicaGroups: the same step (the target-count tensor, the
    gradient buckets and their copies, traced like every other allocation), with the sums across
    groups left as they are, as every collective on the fake backend leaves its tensor; no
    lighthouse, no quorum, every step committed by this group alone."""

    def __init__(self, ft: FaultTolerance, device: torch.device, *_, **__):
        self.cfg, self.device, self.members = ft, device, [ft.replica_group]
        self.group_world = dist.get_world_size() if dist.is_initialized() else 1

    def start_step(self) -> None:
        pass

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def should_commit(self) -> bool:
        return True

    def errored(self) -> Exception | None:
        return None

    def shutdown(self) -> None:
        pass
