"""Optimizer groups and the LR schedule's exact values."""

import math

import pytest
import torch

from titan.config.job_config import LRScheduler, Optimizer
from titan.trainer.optimizer import build_lr_scheduler, build_optimizer, lr_factor


def schedule(steps: int, **kw) -> list[float]:
    cfg = LRScheduler(**kw)
    return [lr_factor(s, total_steps=steps, cfg=cfg) for s in range(steps)]


def test_warmup_then_linear_decay():
    got = schedule(6, warmup_steps=2, decay_type="linear")
    # warmup (s+1)/(w+1); decay over 4 steps reaching 0 at the last step
    assert got == pytest.approx([1 / 3, 2 / 3, 0.75, 0.5, 0.25, 0.0])


def test_cosine_with_min_lr():
    got = schedule(5, warmup_steps=1, decay_type="cosine", min_lr_factor=0.1)
    curve = [0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75, 1.0)]
    assert got == pytest.approx([0.5] + [0.1 + 0.9 * c for c in curve])


def test_wsd_holds_peak_then_decays():
    got = schedule(12, warmup_steps=2, decay_type="sqrt", decay_ratio=0.4)
    # 10 post-warmup steps: 6 stable at the peak, 4 decaying as 1 - sqrt(progress)
    assert got[2:8] == [1.0] * 6
    assert got[8:] == pytest.approx([1 - math.sqrt(p) for p in (0.25, 0.5, 0.75, 1.0)])


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, Optimizer(lr=0.1))
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2, decay_type="linear"), total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * f for f in schedule(6, warmup_steps=2)])


def test_weight_decay_skips_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, Optimizer(weight_decay=0.1, implementation="for-loop"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3
    assert isinstance(opt, torch.optim.AdamW)


def test_lr_schedule_when_warmup_covers_every_step():
    # training.steps == warmup_steps: no decay phase; the factors stay defined (no division by 0)
    cfg = LRScheduler(warmup_steps=2)
    assert [lr_factor(s, total_steps=2, cfg=cfg) for s in range(2)] == [1 / 3, 2 / 3]
