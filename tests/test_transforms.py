"""Single-process transforms: each activation-checkpointing mode and per-block compile give the
plain model's loss and gradients, and leave parameter names as they were."""

import dataclasses

import pytest
import torch
from parallel_harness import COUNTING_BACKEND, compiled_graph_runs

from titan.config.job_config import ActivationCheckpoint, Compile
from titan.models.llama3 import FLAVORS, Transformer
from titan.parallelisms.activation_checkpoint import apply_ac
from titan.parallelisms.compile import apply_compile
from titan.trainer.loss import cross_entropy_sum

ARGS = dataclasses.replace(FLAVORS["debugmodel"], n_layers=4, max_seq_len=64)


def build() -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ARGS)
    return model


def loss_and_grads(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 65), generator=g)
    loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
    loss.backward()
    params = model.named_parameters()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in params}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(build())


@pytest.mark.parametrize(
    "mode, option", [("full", "op"), ("selective", "op"), ("selective", "1"), ("selective", "2")]
)
def test_activation_checkpointing_matches_plain(reference, mode, option):
    model = build()
    apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option=option))
    wrapped = [type(b).__name__ == "CheckpointWrapper" for b in model.layers.values()]
    assert wrapped == ([True, False, True, False] if option == "2" else [True] * 4)
    loss, grads = loss_and_grads(model)
    assert set(model.state_dict()) == set(build().state_dict())  # names are untouched
    torch.testing.assert_close(loss, reference[0], atol=1e-6, rtol=0)
    for name, g in reference[1].items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=0, msg=name)


def test_selective_option_must_be_op_or_positive_int():
    with pytest.raises(ValueError, match="use 'op' or a positive integer N"):
        apply_ac(build(), ActivationCheckpoint(mode="selective", selective_ac_option="0"))


def test_per_block_compile_matches_eager(reference):
    model = build()
    # inductor, counting the compiled graphs that run: a compile that did nothing would match
    # eager too, so each of the 4 blocks must run its compiled graph once in the forward
    apply_compile(model, Compile(enable=True, backend=COUNTING_BACKEND))
    assert set(model.state_dict()) == set(build().state_dict())
    runs = compiled_graph_runs()
    loss, grads = loss_and_grads(model)
    assert compiled_graph_runs() - runs == ARGS.n_layers
    torch.testing.assert_close(loss, reference[0], atol=1e-5, rtol=0)
    for name, g in reference[1].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
