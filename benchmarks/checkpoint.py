"""Checkpoint cost: save and load time, and how long training is blocked by sync vs async saves.

Builds a flavor (optionally with fewer layers, to fit a small machine), gives AdamW real state
with one step, then for each async mode times what the training loop waits for (`maybe_save`
returning) and the save's total time, then the time to load the newest checkpoint back.

    python benchmarks/checkpoint.py --flavor 1B [--n-layers 4] [--device cpu] [--folder /tmp/ckpt]
"""

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from titan.checkpoint.checkpointer import CheckpointManager
from titan.config.job_config import Checkpoint, Optimizer
from titan.models.llama3 import FLAVORS, Transformer
from titan.trainer.optimizer import build_optimizer


class _NoData:
    """A stand-in loader state: the data position is a few bytes and irrelevant to the cost."""

    state_key = "global"

    def state_dict(self) -> dict:
        return {"position": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(flavor: str, n_layers: int | None, device: torch.device):
    args = FLAVORS[flavor]
    if n_layers is not None:
        args = dataclasses.replace(args, n_layers=n_layers)
    args = dataclasses.replace(args, max_seq_len=128)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    optimizer = build_optimizer(model, Optimizer())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materializes exp_avg / exp_avg_sq: the checkpoint's real size
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, folder: Path, model, optimizer, scheduler, device) -> dict[str, float]:
    cfg = Checkpoint(enable=True, folder="ckpt", interval=1, async_mode=mode)
    manager = CheckpointManager(
        cfg, str(folder), model=model, optimizer=optimizer, lr_scheduler=scheduler,
        dataloader=_NoData(),
    )  # fmt: skip
    sync(device)
    start = time.perf_counter()
    manager.maybe_save(step=1, last_step=False)
    blocked = time.perf_counter() - start
    manager.close()  # waits for an asynchronous save
    total = time.perf_counter() - start
    start = time.perf_counter()
    manager.load()
    sync(device)
    load = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (folder / "ckpt").rglob("*") if f.is_file())
    shutil.rmtree(folder / "ckpt")
    return {"blocked_s": blocked, "save_s": total, "load_s": load, "size_gib": size / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="1B")
    parser.add_argument("--n-layers", type=int, default=None, help="fewer layers than the flavor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir)")
    a = parser.parse_args()
    device = torch.device(a.device)
    model, optimizer, scheduler = build(a.flavor, a.n_layers, device)
    n_params = sum(p.numel() for p in model.parameters())
    folder = Path(a.folder or tempfile.mkdtemp(prefix="titan_ckpt_bench_"))
    modes = ["disabled", "async"] + (["async_with_pinned_mem"] if device.type == "cuda" else [])
    print(f"{a.flavor} (n_layers {model.args.n_layers}): {n_params:,} params on {device}, "
          f"torch {torch.__version__}, writing to {folder}")  # fmt: skip
    for mode in modes:
        r = measure(mode, folder, model, optimizer, scheduler, device)
        print(f"{mode:>22}: training blocked {r['blocked_s']:6.2f}s  save {r['save_s']:6.2f}s  "
              f"load {r['load_s']:6.2f}s  size {r['size_gib']:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
