"""Muon (optimizer.name = "Muon"): its step against a float64 implementation of the definition,
every parallel layout against one process, exact resume, and a dry run that traces the
gathered matrices."""

import math

import pytest
import torch
from layout_expect import Expect, check_layout, fsdp, fsdp_tp, tp
from parallel_harness import (
    LOSS_ATOL,
    assert_matches,
    assert_tensor_matches,
    ignore_some_labels,
    make_batches,
    run_layouts,
    run_single,
)
from torch import nn

from titan.config import load_config
from titan.config.job_config import Optimizer
from titan.errors import ConfigError
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


# relative error of the whole move: bf16 Newton-Schulz (torch's) measured 0.7e-2 to 1e-2, fp32
NS_TOL = {"bfloat16": 2.5e-2, "float32": 1e-5}


@pytest.mark.parametrize(
    "adjust, ns_dtype",
    [("original", "bfloat16"), ("match_rms_adamw", "bfloat16"), ("original", "float32")],
)
def test_muon_step_matches_a_float64_reference(adjust, ns_dtype):
    """Five steps of titan's Muon on random gradients: each block matrix (square, tall, wide)
    moves as the float64 definition moves it, to the rounding of Newton-Schulz's dtype
    (NS_TOL). Embedding, output and norms take torch's AdamW step, bitwise."""
    torch.manual_seed(0)
    model = Tiny()
    cfg = Optimizer(
        name="Muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_momentum=0.9,
        muon_weight_decay=0.5, muon_ns_steps=5, muon_adjust_lr=adjust, muon_ns_dtype=ns_dtype,
        implementation="for-loop",
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
        assert err < NS_TOL[ns_dtype], f"{name}: relative error {err:.2e} of the update"
    for name, p in adamw_model.named_parameters():
        if not name.startswith("layers.0.w"):
            assert torch.equal(model.get_parameter(name), p), name


def test_muon_needs_torch_optim_muon(monkeypatch):
    """Where torch has no torch.optim.Muon (before 2.9), start-up says so in one line."""
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError) as e:
        load_config(["--optimizer.name", "Muon"])
    assert "optimizer.name = 'Muon' needs torch.optim.Muon, torch 2.9 or newer" in str(e.value)


# Muon on the blocks, AdamW (the harness's LR, 1e-4) on the rest. Newton-Schulz in fp32: in bf16
# it turns the layouts' fp32 rounding differences into ~1% of the update (3e-5 on the third
# step's loss at FSDP 2, 2e-4 of a weight; titan.trainer.muon.newton_schulz)
MUON = [
    "--optimizer.name",
    "Muon",
    "--optimizer.muon_lr",
    "0.02",
    "--optimizer.muon_ns_dtype",
    "float32",
]
STEPS, GLOBAL_BATCH = 3, 4
ONE = ["--training.local_batch_size", str(GLOBAL_BATCH)]
FSDP = ["--training.local_batch_size", "2"]
TP = ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]
PP = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
      "1", "--training.local_batch_size", "4"]  # fmt: skip
FSDP_TP = ["--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"]
# Weights after three steps, relative to their scale (measured up to 4.3e-6)
WEIGHT_TOL = 1e-5


@pytest.mark.heavy
def test_muon_layouts_match_one_process(tmp_path):
    """FSDP 2, TP 2 and PP 2 (one launch of two ranks) and FSDP 2 x TP 2 (four ranks) against
    one process, three Muon steps: losses, gradient norms and every first-step gradient within
    the harness's tolerances, every weight after the last step within WEIGHT_TOL of its scale.
    In the two-rank launch FSDP 2 also saves after two steps (DCP, sharded momentum) and TP 2
    resumes from there into the one process's last loss and weights."""
    batches = ignore_some_labels(make_batches(STEPS, GLOBAL_BATCH))
    reference = run_single([*ONE, *MUON], batches)
    two = {
        "fsdp 2": (FSDP, fsdp()),
        "tp 2": (TP, tp()),
        "pp 2": (PP, Expect("pp 2", stages={0: [0], 1: [1]})),
    }
    four = {"fsdp 2 x tp 2": (FSDP_TP, fsdp_tp())}
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "1",
            "--job.dump_folder", str(tmp_path)]  # fmt: skip
    legs = [([*FSDP, *MUON, *ckpt], 2), [*TP, *MUON, *ckpt]]  # save at 2; resume from 2
    for world_size, cases in ((2, two), (4, four)):
        runs = [[*args, *MUON] for args, _ in cases.values()]
        results = run_layouts(world_size, runs + (legs if world_size == 2 else []), batches)
        if world_size == 2:
            resumed = results[-1]
            assert resumed["start"] == 2
            torch.testing.assert_close(
                torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][2:]),
                atol=LOSS_ATOL, rtol=0,
            )  # fmt: skip
            for key, param in reference["params"].items():
                assert_tensor_matches(f"resumed: weight {key}", resumed["params"][key], param,
                                      WEIGHT_TOL)  # fmt: skip
        for (name, (_, expect)), got in zip(cases.items(), results, strict=False):
            check_layout(name, got["layout"], expect)
            assert_matches(name, got, reference)
            assert sorted(got["params"]) == sorted(reference["params"])
            for key, param in reference["params"].items():
                from parallel_harness import rel_error

                print(name, key, rel_error(got["params"][key], param))
                assert_tensor_matches(f"{name}: weight {key}", got["params"][key], param,
                                      WEIGHT_TOL)  # fmt: skip
