"""Single-process transforms: each activation-checkpointing mode and per-block compile give the
plain model's loss and gradients, and leave parameter names as they were; op-level AC recomputes
the same matmuls with float8 linears as without."""

import contextlib
import dataclasses
import os

import pytest
import torch
from parallel_harness import COUNTING_BACKEND, compiled_graph_runs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from titan.config.checks import Converters
from titan.config.job_config import ActivationCheckpoint, Compile, Float8
from titan.converters import apply_converters
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


def loss_and_grads(
    model: Transformer, in_backward: contextlib.AbstractContextManager | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 65), generator=g)
    loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
    with in_backward or contextlib.nullcontext():
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


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten._scaled_mm.default)


class MatmulCount(TorchDispatchMode):
    """Counts the matmuls dispatched under it. A dispatch mode runs before tensor subclasses:
    a float8 linear's matmul counts once, as the aten.mm on its float8 tensors, and what torchao
    runs inside it (a dequantized mm here, torch._scaled_mm on float8 GPUs) is not seen again."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def float8(model: Transformer) -> Transformer:
    """Every block linear in float8 (torchao, emulated on CPU); the output layer stays fp32."""
    cfg = Float8(auto_filter_small_kn=False)
    apply_converters(model, Converters(float8=cfg), torch.device("cpu"), fsdp=False)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith("layers.")}
    assert "Float8Linear" in kinds and "Linear" not in kinds
    return model


def test_op_level_ac_recomputes_no_more_float8_matmuls_than_fp32_ones():
    """The op policy saves every second matmul of a block whether its linears are float8 or
    not: the checkpointed backward runs 3 more matmuls per block than the plain backward (wk,
    wo and w3 recomputed, of the 7) in both, and the float8 model's loss and gradients are the
    un-checkpointed float8 model's."""
    recomputed = {}
    for precision, convert in (("fp32", lambda m: m), ("float8", float8)):
        plain, checkpointed = convert(build()), convert(build())
        apply_ac(checkpointed, ActivationCheckpoint(mode="selective", selective_ac_option="op"))
        counts = [MatmulCount(), MatmulCount()]
        (ref_loss, ref_grads), (loss, grads) = (
            loss_and_grads(model, in_backward=count)
            for model, count in zip((plain, checkpointed), counts, strict=True)
        )
        recomputed[precision] = counts[1].count - counts[0].count
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=0, msg=name)
    assert recomputed == {"fp32": 3 * ARGS.n_layers, "float8": 3 * ARGS.n_layers}


class ScaledMatmuls(nn.Module):
    """A plain mm, then two torch._scaled_mm on plain float8 tensors, each output scaled by a
    parameter (so backward needs it: saved, or recomputed)."""

    def __init__(self):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(3, 16, 16))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 32, generator=g)
        self.w = torch.randn(16, 32, generator=g)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        one = torch.ones(())
        x8, w8 = (t.to(torch.float8_e4m3fn) for t in (self.x, self.w))
        outs = [torch.mm(self.x, self.w.t())] + [
            torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            for _ in range(2)
        ]
        return sum((o * s).sum() for o, s in zip(outs, self.scales, strict=True))


def test_op_level_ac_counts_scaled_mm_among_the_matmuls():
    """torch._scaled_mm reaching the policy as itself is a matmul, counted with aten.mm: of the
    three, the first and the third are saved and only the second is recomputed."""
    plain = ScaledMatmuls()
    plain(torch.zeros(())).backward()
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": ScaledMatmuls()})
    apply_ac(model, ActivationCheckpoint(mode="selective", selective_ac_option="op"))
    loss = model.layers["0"](torch.zeros(()))
    with MatmulCount() as count:
        loss.backward()
    assert count.count == 1
    grad = model.layers["0"]._checkpoint_wrapped_module.scales.grad
    assert torch.equal(grad, plain.scales.grad)  # each scale's gradient is its matmul's output


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


EMBEDDING_PROBE = r"""
import json, os, sys
import torch, torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode
from titan.parallelisms.tensor_parallel import VocabParallelEmbedding

class Shapes(TorchDispatchMode):  # the gradient tensors the embedding's backward allocates
    def __init__(self):
        super().__init__()
        self.shapes = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.embedding_dense_backward.default:
            self.shapes.append(list(out.shape))
        return out

def run(rank, style, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    plain = torch.nn.Embedding(64, 8)
    sharded = torch.nn.Embedding(64, 8)
    sharded.load_state_dict(plain.state_dict())
    make = {"titan": lambda: VocabParallelEmbedding(Shard(1)),
            "torch": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))}
    parallelize_module(sharded, mesh, make[style]())
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2))
    (plain(ids) * probe).sum().backward()
    with Shapes() as shapes:
        (sharded(ids) * probe.chunk(2, dim=1)[rank]).sum().backward()
    grad = sharded.weight.grad
    mine = plain.weight.grad.chunk(2)[rank]
    result = {"shapes": shapes.shapes, "placements": str(grad.placements),
              "local": list(grad.to_local().shape),
              "matches": bool(torch.equal(grad.full_tensor().chunk(2)[rank], mine))}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # torch 2.15 on gloo: a rank that leaves first can abort at exit
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[2], sys.argv[3]), nprocs=2)
"""


@pytest.mark.parametrize("style", ["titan", "torch"])
def test_tp_embedding_gradient_is_formed_on_the_ranks_rows_only(tmp_path, style):
    """Under TP the embedding's backward forms only the rank's vocabulary rows of the gradient
    (64 / 2 here; 128,256 / 8 rows of 16,384 for 405B, 1 GiB in place of 8.4 GiB fp32), with the
    plain embedding's values. torch's RowwiseParallel (the "torch" case: what titan used before)
    forms the whole vocabulary's gradient on every rank, which this test tells apart."""
    import json
    import socket
    import subprocess
    import sys

    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(EMBEDDING_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(port), style, str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["matches"]  # the gradient's values are the plain embedding's
    if style == "titan":
        assert result["shapes"] == [[32, 8]] and result["local"] == [32, 8]
        assert result["placements"] == "(Shard(dim=0),)"
    else:  # what the test must be able to see: a full-vocabulary gradient on each rank
        assert result["shapes"] == [[64, 8]] and result["placements"] == "(Replicate(),)"
