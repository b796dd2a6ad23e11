"""activation_checkpoint.mode = memory_budget: a compiled run keeps only what the budget allows
(torch.compile's min-cut partitioner recomputes the rest) and gives the plain run's loss and
gradients."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._functorch.config as functorch_config
from torch.autograd.graph import saved_tensors_hooks

from titan.config import load_config
from titan.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs/debug_model.toml")


@pytest.fixture
def fresh_compile():
    # apply_ac sets the budget process-wide, and dynamo may reuse a block graph compiled by an
    # earlier test under another budget: start from a clean cache, and leave the budget as found.
    # (Not monkeypatch: its undo deletes the attribute from torch's config module, which breaks
    # every later compile.)
    with functorch_config.patch(activation_memory_budget=functorch_config.activation_memory_budget):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()


def make_trainer(dump: Path, *overrides: str) -> Trainer:
    args = [
        "--job.dump_folder", str(dump), "--training.device", "cpu", "--training.seq_len", "64",
        "--training.local_batch_size", "2", "--metrics.log_freq", "100", *overrides,
    ]  # fmt: skip
    return Trainer(load_config(args, config_file=DEBUG_TOML))


def loss_and_grads(trainer: Trainer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = trainer.forward_backward([batch])
    return loss, {name: p.grad for name, p in trainer.model.named_parameters()}


def saved_storage(block: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor) -> set[int]:
    """Storage of every non-parameter tensor `block` keeps for its backward on input x."""
    params = {p.data_ptr() for p in block.parameters()}
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved.add(t.data_ptr())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        block(x, rope).sum().backward()
    return saved


def test_memory_budget_recomputes_and_matches_plain(tmp_path, fresh_compile):
    plain = make_trainer(tmp_path / "plain")
    budget = make_trainer(
        tmp_path / "budget", "--activation_checkpoint.mode", "memory_budget",
        "--activation_checkpoint.memory_budget", "0", "--compile.enable",
        "--compile.components", "model,loss",
    )  # fmt: skip
    assert budget.cfg.compile.components == ["model", "loss"]
    assert hasattr(budget.loss_fn, "_torchdynamo_orig_callable")  # compiled
    batch = next(iter(plain.dataloader))
    loss, grads = loss_and_grads(budget, batch)
    ref_loss, ref_grads = loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # Budget 0: a block keeps nothing but its inputs (the hidden state and the RoPE table) and
    # recomputes every activation in backward; compiled without the budget it keeps ~20 more.
    x = torch.randn(2, 64, budget.model_args.dim, requires_grad=True)
    rope = budget.model.rope_cache[:64]
    kept = saved_storage(budget.model.layers["0"], x, rope)
    assert kept == {x.data_ptr(), rope.data_ptr()}, f"{len(kept)} tensors kept, not the 2 inputs"
    assert len(saved_storage(plain.model.layers["0"], x, rope)) > 10  # eager keeps activations


def test_apply_ac_sets_the_budget_in_a_fresh_process():
    # `import torch` does not import torch._functorch.config: apply_ac must not rely on another
    # module having done so
    code = (
        "import torch; from titan.config.job_config import ActivationCheckpoint as AC; "
        "from titan.parallelisms.activation_checkpoint import apply_ac; "
        "apply_ac(torch.nn.Module(), AC(mode='memory_budget', memory_budget=0.25)); "
        "print(torch._functorch.config.activation_memory_budget)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.strip() == "0.25", run.stderr[-2000:]
