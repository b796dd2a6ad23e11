"""The Trainer of one torchft replica group ([fault_tolerance] enable): the same step, with the
target count, loss and gradients summed over the groups in the step's quorum, the update applied
only when the quorum commits, and a step that fails to commit redone on the same data.

Data: step s reads the global batch of windows [c_s, c_s + B) (B the global batch), cut into
replica_groups x dp slices as in an HSDP run; group g reads slice g whether or not the others
are up. A group absent from a step's quorum leaves its slice untrained (logged as a warning with
the windows); the others neither skip nor repeat theirs. A group that rejoins takes the step,
the data position (c_s), the weights, the optimizer's moments, the LR schedule and the anomaly
guard's history from a live peer and reads its own slice of that same step.
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from titan.config.job_config import JobConfig
from titan.data.tokens import GlobalBatchLoader
from titan.errors import ConfigError
from titan.logger import logger
from titan.parallelisms.distributed import local_tensor
from titan.trainer.fault_tolerance import ReplicaGroups, TracedGroups
from titan.trainer.trainer import Trainer


def group_config(cfg: JobConfig) -> JobConfig:
    """The config a group runs: its own dump folder (log, metrics, checkpoints) under
    job.dump_folder/replica_<g>, so groups started with the same flags do not collide."""
    g = cfg.fault_tolerance.replica_group
    folder = str(Path(cfg.job.dump_folder) / f"replica_{g}")
    return dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, dump_folder=folder))


class FaultTolerantTrainer(Trainer):
    def __init__(self, cfg: JobConfig):
        super().__init__(group_config(cfg))
        if not isinstance(self.dataloader, GlobalBatchLoader):
            raise ConfigError(
                "fault_tolerance.enable needs indexed data (global sample order, so a group "
                "knows its slice of any step): preprocess the stream with titan-preprocess"
            )
        self.committed, self.healed = True, False
        self._data_state = self.dataloader.state_dict()
        self.ft = (TracedGroups if self.dry_run else ReplicaGroups)(
            self.cfg.fault_tolerance, self.device, self.heal_state_dict,
            self.load_heal_state_dict, step=self.step,
        )  # fmt: skip

    # -- healing: what a live peer sends a group that is behind -----------------------------
    def heal_state_dict(self) -> dict[str, Any]:
        """This rank's state a peer's rank of the same group rank loads to heal (local shards:
        the two groups have the same layout). Read in torchft's quorum thread while this
        group's main thread waits in start_quorum, before the step's data is read."""
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        moments = {
            i: {k: local_tensor(v) if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if p in opt.state
        }
        return {
            "model": {k: local_tensor(v) for k, v in self.model.state_dict().items()},
            "optimizer": {
                "state": moments,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            },  # fmt: skip
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "dataloader": self.dataloader.state_dict(),
            "guard": self.guard.state_dict(),
            "step": self.step,
        }

    @torch.no_grad()
    def load_heal_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a peer's state into this rank's tensors in place (FSDP's shards stay where they
        are); optimizer moments this group has not created yet are created."""
        for k, v in self.model.state_dict().items():
            local_tensor(v).copy_(state["model"][k])
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for k, v in state["optimizer"]["state"].get(i, {}).items():
                have = opt.state[p].get(k)
                if have is not None and torch.is_tensor(have):
                    local_tensor(have).copy_(v)
                elif torch.is_tensor(v) and v.dim() > 0:  # a moment: shaped like the parameter
                    new = torch.zeros_like(p, dtype=v.dtype)
                    local_tensor(new).copy_(v)
                    opt.state[p][k] = new
                else:  # Adam's step count (a CPU scalar tensor) or a plain value
                    opt.state[p][k] = v.clone() if torch.is_tensor(v) else v
        for group, sent in zip(opt.param_groups, state["optimizer"]["groups"], strict=True):
            group.update(sent)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.dataloader.load_state_dict(state["dataloader"])
        self.guard.load_state_dict(state["guard"])
        self.step = state["step"]
        self.healed = True
        logger.warning(
            f"torchft: healed from a live peer at step {self.step}: weights, optimizer, LR "
            f"schedule, anomaly guard and data position (window {self.dataloader.consumed})"
        )

    # -- the step ---------------------------------------------------------------------------
    def next_microbatches(self, data_iter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Join the step's quorum first (healing moves the step and the data position), then
        read this group's slice of the step's global batch."""
        self.healed = False  # load_heal_state_dict sets it
        self.ft.start_step()
        self._data_state = self.dataloader.state_dict()
        return super().next_microbatches(self.dataloader)

    def _set_loss_scale(self, microbatches) -> None:
        """As the Trainer's, with the target count of the groups in the quorum: the loss stays
        the sum over the trained tokens / their count, whichever groups took part."""
        super()._set_loss_scale(microbatches)  # this group's count over its dp ranks
        with unset_fake_temporarily():  # real counts, in a dry run too
            self.n_targets = self.ft.sum_targets(self.n_targets)
        self.loss_scale = self.grad_average_over / max(self.n_targets, 1.0)
        if self.poison is not None:
            self.loss_scale *= self.poison
        missing = [g for g in range(self.cfg.fault_tolerance.replica_groups)
                   if g not in self.ft.members]  # fmt: skip
        if missing and self.ft.errored() is None and not self.dry_run:  # (errored: redone)
            c, b = self._data_state["windows"], self.dataloader.global_batch
            logger.warning(f"step {self.step}: groups {missing} are not in the quorum: their "
                           f"slices of windows [{c}, {c + b}) are not trained")  # fmt: skip

    def _step_loss(self, local_loss: torch.Tensor) -> torch.Tensor:
        return self.ft.sum_loss(super()._step_loss(local_loss))

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's pieces of the gradients (FSDP's shards, TP's local parts)."""
        return [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]

    def optimizer_step(self, loss: torch.Tensor, replay=None) -> tuple[float, float]:
        """Sum the gradients over the groups, then apply them only if the quorum commits (no
        replay: a replay's collectives would follow the commit vote)."""
        self.ft.sum_grads(self.local_grads())
        self.committed = self.ft.should_commit()
        if not self.committed:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), float("nan")
        return super().optimizer_step(loss, None)

    def train_step(self, microbatches) -> tuple[float, float]:
        """The step, redone (new quorum, same data unless this group heals) until committed."""
        while True:
            result = super().train_step(microbatches)
            if self.committed:
                return result
            logger.warning(f"step {self.step}: not committed by the quorum "
                           f"({self.ft.errored()}); redoing it")  # fmt: skip
            self.dataloader.load_state_dict(self._data_state)
            microbatches = self.next_microbatches(self.dataloader)

    def step_metrics(self) -> dict[str, float]:
        """The groups in the step's quorum and the target tokens they trained."""
        return {"ft_groups": float(len(self.ft.members)), "targets": self.n_targets}

    def train(self) -> list[float]:
        try:
            return super().train()
        finally:
            self.ft.shutdown()
