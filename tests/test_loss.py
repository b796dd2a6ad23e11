"""The chunked cross-entropy against the plain one: loss and gradient within fp32 rounding (bf16
gradients equal), no fp32 tensor of the whole micro-batch's logits, the vocabulary-sharded form
under loss parallel on 2 gloo ranks, and compiled."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from titan.config.job_config import Compile
from titan.trainer.loss import build_loss_fn, chunked_cross_entropy_sum, cross_entropy_sum


def batch(vocab=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 37, vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, 37), generator=g)
    labels[0, :5] = -100  # ignored targets, a whole chunk of them at chunk 4
    labels[1, -1] = -100
    return logits, labels


def loss_and_grad(fn, logits, labels, *args):
    loss = fn(logits, labels, *args)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, grad


@pytest.mark.parametrize("chunk", [1, 4, 8, 37, 74, 1000])
def test_chunked_equals_plain_fp32(chunk):
    logits, labels = batch()
    before = logits.detach().clone()
    loss, grad = loss_and_grad(cross_entropy_sum, logits, labels, 0.3)
    chunked, chunked_grad = loss_and_grad(chunked_cross_entropy_sum, logits, labels, 0.3, chunk)
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked_grad, grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(logits.detach(), before)  # the logits are not worked on in place
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy_sum(logits, labels, 0.3, chunk), loss)


def test_chunked_bf16_gradient_equals_plain():
    """bf16 logits: the plain loss's gradient is computed in fp32 and rounded to bf16 once; so
    is the chunked one's, with the scale applied before rounding."""
    logits, labels = batch(dtype=torch.bfloat16)
    loss, grad = loss_and_grad(cross_entropy_sum, logits, labels, 1 / 67)
    chunked, chunked_grad = loss_and_grad(chunked_cross_entropy_sum, logits, labels, 1 / 67, 8)
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    assert chunked_grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked_grad, grad, rtol=0, atol=0)


class LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn", ["plain", "chunked"])
def test_no_fp32_tensor_of_the_whole_logits(fn):
    """bf16 logits of 74 tokens x 50: the plain loss makes fp32 ones of all 74 tokens, the
    chunked one of a chunk (8 tokens) at most, in the forward and the backward."""
    logits, labels = batch(dtype=torch.bfloat16)
    loss_fn = cross_entropy_sum if fn == "plain" else build_loss_fn(Compile(), 8)
    with LargestFloat32() as seen:
        loss_fn(logits, labels, 0.5).backward()
    assert seen.largest == (74 * 50 if fn == "plain" else 8 * 50)


def test_second_backward_is_refused():
    logits, labels = batch()
    loss = chunked_cross_entropy_sum(logits, labels, 1.0, 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="needs training.loss_chunk_tokens = 0"):
        loss.backward()


def test_compiled_chunked_loss_equals_eager():
    logits, labels = batch()
    loss, grad = loss_and_grad(cross_entropy_sum, logits, labels, 0.3)
    compiled = build_loss_fn(Compile(enable=True, backend="aot_eager", components=["loss"]), 8)
    graphs = counters["stats"]["unique_graphs"]
    for scale in (0.3, 0.7, 0.9, 1.1):  # a new scale each step (1 / the step's targets)
        got, got_grad = loss_and_grad(compiled, logits, labels, scale)
        torch.testing.assert_close(got, loss * scale / 0.3, rtol=1e-6, atol=0)
        torch.testing.assert_close(got_grad, grad * scale / 0.3, rtol=1e-5, atol=1e-7)
    # the first graph takes the scale as a constant, the one recompile makes it an input
    assert counters["stats"]["unique_graphs"] - graphs == 2


LOSS_PARALLEL_PROBE = r"""
import json, os, sys
import torch, torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel
from titan.trainer.loss import chunked_cross_entropy_sum, cross_entropy_sum

def run(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(2, 37, 51, generator=g)).requires_grad_()  # 26 + 25 vocabulary ids
    labels = torch.randint(0, 51, (2, 37), generator=g)
    labels[0, :5] = -100
    labels[1, 3] = 0; labels[1, 4] = 50  # the first and the last id: one on each rank
    loss = cross_entropy_sum(full, labels, 0.3)
    loss.backward()
    sharded = distribute_tensor(full.detach(), mesh, [Shard(2)]).requires_grad_()
    with loss_parallel():
        got = chunked_cross_entropy_sum(sharded, labels, 0.3, 8)
        got.backward()
    result = {"loss": [loss.item(), got.item()],
              "grad": (sharded.grad.full_tensor() - full.grad).abs().max().item(),
              "placements": str(sharded.grad.placements)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # torch 2.15 on gloo: a rank that leaves first can abort at exit
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[2],), nprocs=2)
"""


def test_loss_parallel_chunked_equals_plain(tmp_path):
    """Vocabulary-sharded logits (an uneven split, targets in each shard) on 2 gloo ranks give
    the plain loss of the whole logits and their gradient, sharded as the logits are."""
    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(LOSS_PARALLEL_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(port), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    result = json.loads(out.read_text())
    plain, chunked = result["loss"]
    assert abs(chunked - plain) <= 1e-6 * abs(plain)
    assert result["grad"] < 1e-6 and result["placements"] == "(Shard(dim=2),)"
