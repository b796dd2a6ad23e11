"""Run titan's Trainer in several fork-started CPU/gloo processes and in one, on the same batches.

`train_case(overrides, batches, stop)` builds a Trainer from the debug config plus overrides,
feeds each data-parallel rank its rows of the global batches from the step it resumed at (with
[checkpoint] enabled, saving as configured) up to `stop` (default: all), and returns (from
rank 0) the loss and gradient norm of every step it ran, every full gradient of its first step
and every full parameter at the end. `run_layouts(world_size, cases, batches)` runs many cases,
one after the other, in one launch of world_size processes (a case is its overrides, or
(overrides, stop)); `run_single(overrides, batches, stop)` is the one-process reference.
"""

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from titan.config import load_config
from titan.train import Trainer

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(REPO / "train_configs" / "debug_model.toml")
# Small and quick: the debug model on 32-token sequences of synthetic data, no logging. The LR is
# small because Adam turns 1e-8 rounding differences of near-zero gradients into updates of up to
# lr; at 1e-3 three steps of FSDP x TP drift 1.6e-5 from one process, at 1e-4 under 2e-6.
BASE = [
    "--training.seq_len", "32", "--data.dataset", "synthetic", "--lr_scheduler.warmup_steps", "0",
    "--metrics.log_freq", "1000", "--optimizer.lr", "1e-4", "--training.device", "cpu",
]  # fmt: skip
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def make_batches(steps: int, global_batch: int, seq_len: int = 32, vocab: int = 2304, seed=1):
    """(steps, global_batch, seq_len + 1) token ids: rows of inputs and shifted labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, global_batch, seq_len + 1), generator=g)


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train_case(overrides: list[str], batches: torch.Tensor, stop: int | None = None) -> dict:
    cfg = load_config(["--job.config_file", DEBUG_TOML, *BASE, *overrides])
    trainer = Trainer(cfg)
    n_dp, dp_rank = trainer.parallel_dims.dp, trainer.dp_rank
    local = batches.shape[1] // n_dp
    per_micro = cfg.training.local_batch_size
    losses, norms, grads = [], [], {}
    start = trainer.step  # > 0 when the Trainer resumed from a checkpoint
    for step in range(start, len(batches) if stop is None else stop):
        rows = batches[step][dp_rank * local : (dp_rank + 1) * local]
        micro = [(m[:, :-1], m[:, 1:]) for m in rows.split(per_micro)]
        assert len(micro) == trainer.grad_accum_steps
        loss = trainer.forward_backward(micro)
        if step == start:
            for name, p in trainer.model.named_parameters():
                grads[_clean(name)] = _full(p.grad)
        loss_value, norm = trainer.optimizer_step(loss)
        losses.append(loss_value)
        norms.append(norm)
        trainer.step = step + 1
        if trainer.checkpointer is not None:
            trainer.checkpointer.maybe_save(trainer.step, last_step=False)
    if trainer.checkpointer is not None:
        trainer.checkpointer.close()
    params = {_clean(n): _full(p) for n, p in trainer.model.named_parameters()}
    return {"start": start, "losses": losses, "norms": norms, "grads": grads, "params": params}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cases, batches, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="localhost", MASTER_PORT=str(port),
    )  # fmt: skip
    # A fresh inductor cache per launch: an entry left by other code once gave a compiled TP block
    # wrong numerics here (torch 2.13); each launch compiles what it runs.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(out_dir, "inductor"))
    torch.set_num_threads(1)
    results = []
    for case in cases:
        overrides, stop = case if isinstance(case, tuple) else (case, None)
        results.append(train_case(overrides, batches, stop))
    if rank == 0:
        Path(out_dir, "results.pkl").write_bytes(pickle.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_layouts(world_size: int, cases: list, batches: torch.Tensor) -> list[dict]:
    """Each case's rank-0 results, all cases run in one launch of world_size processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(world_size, _free_port(), cases, batches, out), nprocs=world_size,
            start_method="fork",
        )  # fmt: skip
        return pickle.loads(Path(out, "results.pkl").read_bytes())


def run_single(overrides: list[str], batches: torch.Tensor, stop: int | None = None) -> dict:
    """The one-process reference (no process group)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "COMM_MODE"):
        os.environ.pop(key, None)
    return train_case(overrides, batches, stop)
