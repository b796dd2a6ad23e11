"""Muon (optimizer.name = "Muon"): its step against a float64 implementation of the definition,
every parallel layout against one process, exact resume, and a dry run that traces the
gathered matrices."""

import math

import pytest
import torch
from torch import nn

from titan.config.job_config import Optimizer
from titan.trainer.muon import MuonAdamW
from titan.trainer.optimizer import build_optimizer

# Keller Jordan's quintic Newton-Schulz coefficients
NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


class Tiny(nn.Module):
    """Llama 3's parameter names on small shapes: wide, tall and square block matrices."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 8)
        self.layers = nn.ModuleDict({"0": nn.ModuleDict({
            "wq": nn.Linear(8, 8, bias=False),
            "w1": nn.Linear(8, 24, bias=False),  # weight 24 x 8: tall
            "w2": nn.Linear(24, 8, bias=False),  # weight 8 x 24: wide
            "ffn_norm": nn.RMSNorm(8),
        })})  # fmt: skip
        self.norm = nn.RMSNorm(8)
        self.output = nn.Linear(8, 10, bias=False)


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz quintic in float64: X <- a X + (b A + c A^2) X, A = X X^T, from X = G/|G|_F
    (on the transpose of a tall matrix, so that A is the smaller Gram matrix)."""
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = NS_A * x + (NS_B * a + NS_C * a @ a) @ x
    return x.T if tall else x


def reference_muon(w, grads, lr, momentum, wd, steps, adjust) -> torch.Tensor:
    """Muon from its definition, float64: B <- mu B + g; Nesterov g + mu B; orthogonalize;
    W <- W (1 - lr wd) - lr' O, lr' the LR scaled by the matrix's shape."""
    w, b = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    m, n = w.shape
    scale = math.sqrt(max(1, m / n)) if adjust == "original" else 0.2 * math.sqrt(max(m, n))
    for g in grads:
        g = g.double()
        b = momentum * b + g
        o = orthogonalize(g + momentum * b, steps)
        w = w * (1 - lr * wd) - lr * scale * o
    return w


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_step_matches_a_float64_reference(adjust):
    """Five steps of titan's Muon on random gradients: each block matrix (square, tall, wide)
    moves as the float64 definition moves it, to the bf16 rounding of torch's Newton-Schulz
    (measured 0.7e-2 to 1e-2 of the total move, tolerance 2.5e-2). Embedding, output and
    norms take torch's AdamW step, bitwise."""
    torch.manual_seed(0)
    model = Tiny()
    cfg = Optimizer(
        name="Muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_momentum=0.9,
        muon_weight_decay=0.5, muon_ns_steps=5, muon_adjust_lr=adjust, implementation="for-loop",
    )  # fmt: skip
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    block = model.layers["0"]
    matrices = {"wq": block["wq"].weight, "w1": block["w1"].weight, "w2": block["w2"].weight}
    others = [model.tok_embeddings.weight, model.output.weight, block["ffn_norm"].weight,
              model.norm.weight]  # fmt: skip
    assert [set(g["params"]) for g in opt.param_groups] == [
        set(matrices.values()),
        set(others[:2]),
        set(others[2:]),
    ]
    initial = {k: p.detach().clone() for k, p in matrices.items()}
    adamw_model = Tiny()
    adamw_model.load_state_dict(model.state_dict())
    adamw = torch.optim.AdamW(
        [{"params": [adamw_model.tok_embeddings.weight, adamw_model.output.weight]},
         {"params": [adamw_model.layers["0"]["ffn_norm"].weight, adamw_model.norm.weight],
          "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False,
    )  # fmt: skip
    grads = {k: [torch.randn_like(p) for _ in range(5)] for k, p in matrices.items()}
    for step in range(5):
        for name, p in matrices.items():
            p.grad = grads[name][step]
        for p, q in zip(others, [adamw_model.tok_embeddings.weight, adamw_model.output.weight,
                                 adamw_model.layers["0"]["ffn_norm"].weight,
                                 adamw_model.norm.weight], strict=True):  # fmt: skip
            p.grad = q.grad = torch.randn_like(p)
        opt.step()
        adamw.step()
    for name, p in matrices.items():
        ref = reference_muon(initial[name], grads[name], 0.02, 0.9, 0.5, 5, adjust)
        moved, ref_moved = (
            p.detach().double() - initial[name].double(),
            ref - initial[name].double(),
        )
        err = (moved - ref_moved).norm() / ref_moved.norm()
        assert err < 2.5e-2, f"{name}: relative error {err:.2e} of the update"
    for name, p in adamw_model.named_parameters():
        if not name.startswith("layers.0.w"):
            assert torch.equal(model.get_parameter(name), p), name
