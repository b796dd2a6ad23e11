"""clip_grad_norm_ against torch's on the full gradients, and the trainer's stop on a bad norm.

One process: plain tensors. Four fork-started CPU/gloo processes, one launch for every layout:
DTensor gradients on 1-D and 2x2 meshes (Shard, Replicate, Partial, uneven shards, a mix with
plain tensors) and pipeline-like stages joined by extra_mesh. Every result is compared with
torch.nn.utils.clip_grad_norm_ over the full tensors and a float64 norm computed by hand.
"""

import copy
import math
import multiprocessing
import os
import pickle
import re
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from titan.config import load_config
from titan.errors import NonFiniteLossError
from titan.parallelisms.distributed import clip_grad_norm_
from titan.trainer.trainer import Trainer

DEBUG_TOML = str(Path(__file__).resolve().parents[1] / "titan/train_configs/debug_model.toml")
WORLD_SIZE = 4
# titan sums squares in float64, so its norm matches a float64 hand computation to rounding;
# torch's CPU norm accumulates in float32 and its clip coefficient is a float32 tensor.
NORM_RTOL = 1e-10
TORCH_RTOL = 1e-6


def hand_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads))


def torch_clip(grads: list[torch.Tensor], max_norm: float) -> tuple[float, list[torch.Tensor]]:
    """torch.nn.utils.clip_grad_norm_ on copies of full gradients: (norm, clipped gradients)."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.item(), [p.grad for p in params]


def with_grads(grads: list[torch.Tensor | None], shape=(3,)) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(shape if g is None else g.shape))
        p.grad = None if g is None else g.clone()
        params.append(p)
    return params


def plain_grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (5, 7, 3), (1,), (4096,)]
    # different scales, and a large tensor whose mean is far from 0, where a float32 sum of
    # squares would already be off in the 7th digit
    grads = [(i + 1) * torch.randn(s, generator=g) for i, s in enumerate(shapes)]
    grads[-1] += 3.0
    return grads


# ---- one process, plain tensors ----


def test_norm_and_clipped_grads_match_torch():
    grads = plain_grads()
    ref_norm, ref_clipped = torch_clip(grads, max_norm=2.0)
    params = with_grads([grads[0], None, *grads[1:], None])
    norm = clip_grad_norm_(params, max_norm=2.0)
    assert norm == pytest.approx(hand_norm(grads), rel=NORM_RTOL)
    assert norm == pytest.approx(ref_norm, rel=TORCH_RTOL)
    assert norm > 10  # the case clips hard: a coefficient left out or doubled shows
    clipped = [p.grad for p in params if p.grad is not None]
    assert params[1].grad is None and params[-1].grad is None  # skipped, not created
    for i, (got, want) in enumerate(zip(clipped, ref_clipped, strict=True)):
        torch.testing.assert_close(got, want, rtol=TORCH_RTOL, atol=0, msg=f"grad {i}")
    assert hand_norm(clipped) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_max_norm_not_positive_returns_norm_without_clipping(max_norm):
    grads = plain_grads(1)
    params = with_grads(grads)
    assert clip_grad_norm_(params, max_norm) == pytest.approx(hand_norm(grads), rel=NORM_RTOL)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        same = torch.equal(p.grad, g)
        assert same, f"grad {i} changed with max_norm {max_norm}"


def test_norm_below_max_norm_leaves_grads_bit_for_bit():
    grads = plain_grads(2)
    params = with_grads(grads)
    norm = clip_grad_norm_(params, max_norm=hand_norm(grads) * 1.01)
    assert norm == pytest.approx(hand_norm(grads), rel=NORM_RTOL)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        same = torch.equal(p.grad, g)
        assert same, f"grad {i} changed though the norm is below max_norm"


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_norm_is_returned_and_grads_are_left_alone(bad):
    grads = plain_grads(3)
    grads[2][1, 2, 0] = bad
    params = with_grads(grads)
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert (math.isinf(norm) and norm > 0) if math.isinf(bad) else math.isnan(norm)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        same = torch.equal(p.grad.nan_to_num(), g.nan_to_num())
        assert same, f"grad {i} was scaled though the norm is {norm}"


def test_no_grads_gives_zero():
    assert clip_grad_norm_(with_grads([None, None]), max_norm=1.0) == 0.0


# ---- DTensor layouts in four processes ----


class G(NamedTuple):
    """One gradient of a distributed case: its full shape and where it lives."""

    shape: tuple[int, ...]
    placements: tuple | None = None  # None: a plain tensor, the same on every rank holding it
    mesh: str = "1d"  # "1d" (4 ranks), "2d" (2x2), or one dimension of it: "outer", "inner"
    stage: int | None = None  # held only by the ranks at this coordinate of the case's extra mesh


# Shard(0) on 1d: 7 rows -> 2,2,2,1; 3 rows -> 1,1,1,0 (an empty piece); 5 columns -> 2,2,1,0
CASES: dict[str, tuple[list[G], str | None]] = {
    "fsdp_shard0": ([G((16, 8), (Shard(0),)), G((8,), (Shard(0),)), G((12, 4), (Shard(0),))], None),
    "shard1": ([G((6, 12), (Shard(1),)), G((4, 8), (Shard(1),))], None),
    "tp_replicated_norm": (
        [G((16, 8), (Shard(0),)), G((8, 16), (Shard(1),)), G((8,), (Replicate(),))],
        None,
    ),
    "partial": ([G((8, 8), (Partial(),)), G((16, 4), (Shard(0),))], None),
    "uneven": ([G((7, 5), (Shard(0),)), G((3, 5), (Shard(0),)), G((4, 5), (Shard(1),))], None),
    "2d_shard_shard": (
        [G((8, 6), (Shard(0), Shard(0)), "2d"), G((5, 3), (Shard(0), Shard(0)), "2d")],
        None,
    ),
    "2d_hsdp": (
        [G((8, 6), (Replicate(), Shard(0)), "2d"), G((6,), (Replicate(), Shard(0)), "2d")],
        None,
    ),
    "2d_fsdp_tp": (
        [
            G((8, 6), (Shard(0), Shard(1)), "2d"),
            G((6, 9), (Shard(0), Shard(1)), "2d"),
            G((6,), (Shard(0), Replicate()), "2d"),
        ],
        None,
    ),
    "2d_partial": (
        [G((8, 6), (Shard(0), Partial()), "2d"), G((8, 6), (Shard(0), Shard(1)), "2d")],
        None,
    ),
    "mixed": (
        [
            G((6, 4)),
            G((8, 6), (Shard(0), Shard(1)), "2d"),
            G((8, 4), (Shard(0),), "inner"),
            G((5,), (Replicate(),), "outer"),
            G((3, 3)),
        ],
        None,
    ),
    # extra_mesh sums whole per-stage norms, so each parameter lives on exactly one stage; a
    # tensor held by every stage (or a DTensor spanning the stage dimension) would count per stage
    "stages4": (
        [G((6, 4), stage=0), G((5,), stage=1), G((3, 3), stage=2), G((4, 4), stage=3)],
        "1d",
    ),
    "stages2_fsdp2": (
        [
            G((8, 4), (Shard(0),), "inner", stage=0),
            G((6,), (Replicate(),), "inner", stage=0),
            G((6, 6), (Shard(1),), "inner", stage=1),
            G((4,), stage=1),
        ],
        "outer",
    ),
}
MESH_SHAPES = {"1d": (4,), "2d": (2, 2), "outer": (2,), "inner": (2,)}


def full_grad(case: str, j: int, g: G) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full gradient, the same on every rank; for a Partial layout also the per-rank pieces.

    Pieces are multiples of 1/4, so their sum is exact in any order.
    """
    gen = torch.Generator().manual_seed(1000 * list(CASES).index(case) + j)
    partial_dims = [i for i, p in enumerate(g.placements or ()) if p.is_partial()]
    if not partial_dims:
        return (j + 1) * torch.randn(g.shape, generator=gen), None
    n = MESH_SHAPES[g.mesh][partial_dims[0]]
    pieces = torch.randint(-8, 9, (n, *g.shape), generator=gen).float() / 4
    return pieces.sum(0), pieces


def case_reference(case: str) -> tuple[float, list[torch.Tensor], float, list[torch.Tensor]]:
    """(max_norm, full gradients of the union of all stages, torch's norm, torch's clipped)."""
    grads = [full_grad(case, j, g)[0] for j, g in enumerate(CASES[case][0])]
    max_norm = hand_norm(grads) / 2  # clip every case, by a factor of 2
    return max_norm, grads, *torch_clip(grads, max_norm)


def distribute(full, pieces, g: G, meshes: dict[str, DeviceMesh]) -> torch.Tensor:
    if g.placements is None:
        return full.clone()
    mesh = meshes[g.mesh]
    if pieces is None:
        # every rank has the full tensor: each keeps its own shard, no communication
        return distribute_tensor(full, mesh, g.placements, src_data_rank=None)
    # Partial: a rank holds the piece of its coordinate on the Partial dimension, laid out as the
    # other placements say; the pending sum of the pieces is the full gradient.
    dim = next(i for i, p in enumerate(g.placements) if p.is_partial())
    others = [Replicate() if p.is_partial() else p for p in g.placements]
    piece = pieces[mesh.get_local_rank(dim)]
    local = distribute_tensor(piece, mesh, others, src_data_rank=None).to_local()
    return DTensor.from_local(local, mesh, g.placements, shape=full.shape, stride=full.stride())


def run_case(case: str, meshes: dict[str, DeviceMesh]) -> tuple[float, dict[int, torch.Tensor]]:
    """This rank's returned norm and the full clipped gradients of the parameters it holds."""
    specs, extra = CASES[case]
    stage = meshes[extra].get_local_rank() if extra else None
    max_norm = case_reference(case)[0]
    params = {}
    for j, g in enumerate(specs):
        if g.stage is not None and g.stage != stage:
            continue
        grad = distribute(*full_grad(case, j, g), g, meshes)
        params[j] = torch.nn.Parameter(torch.zeros_like(grad))
        params[j].grad = grad
    norm = clip_grad_norm_(list(params.values()), max_norm, extra_mesh=meshes.get(extra))
    clipped = {}
    for j, p in params.items():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        clipped[j] = grad.detach().clone()
    return norm, clipped


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "inner"))
    meshes = {
        "1d": init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("all",)),
        "2d": mesh2d,
        "outer": mesh2d["outer"],
        "inner": mesh2d["inner"],
    }
    results = {case: run_case(case, meshes) for case in CASES}
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results() -> list[dict]:
    """Every case's results on every rank, from one launch of four processes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # from a clean server process, as tests/parallel_harness.py does (and with its preload)
    multiprocessing.set_forkserver_preload(["parallel_harness"])
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, out), nprocs=WORLD_SIZE, start_method="forkserver")
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", CASES)
def test_distributed_layout_matches_full_tensors(case, distributed_results):
    max_norm, grads, ref_norm, ref_clipped = case_reference(case)
    specs, extra = CASES[case]
    for rank, results in enumerate(distributed_results):
        norm, clipped = results[case]
        assert norm == pytest.approx(hand_norm(grads), rel=NORM_RTOL), (
            f"rank {rank}'s norm is not the float64 norm of the full gradients"
        )
        assert norm == pytest.approx(ref_norm, rel=TORCH_RTOL), f"rank {rank}'s norm vs torch"
        stage = (rank // 2 if extra == "outer" else rank) if extra else None
        held = [j for j, g in enumerate(specs) if g.stage is None or g.stage == stage]
        assert sorted(clipped) == held, f"rank {rank} holds the wrong parameters"
        for j in held:
            torch.testing.assert_close(
                clipped[j], ref_clipped[j], rtol=TORCH_RTOL, atol=0,
                msg=lambda m, j=j, rank=rank: f"rank {rank}, grad {j} {specs[j]}: {m}",
            )  # fmt: skip


# ---- the trainer stops on a non-finite gradient norm with a finite loss ----


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        same = torch.equal(a, b)
        assert same, f"{where} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_grad_norm_with_finite_loss_stops_without_update(tmp_path, bad):
    args = [
        "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "1000",
        "--training.device", "cpu", "--data.dataset", "synthetic", "--training.seq_len", "32",
        "--training.local_batch_size", "2",
    ]  # fmt: skip
    trainer = Trainer(load_config(args, config_file=DEBUG_TOML))
    data = iter(trainer.dataloader)
    # one real step first, so that the optimizer has state that must survive
    trainer.optimizer_step(trainer.forward_backward([next(data)]))
    trainer.step = 2
    loss = trainer.forward_backward([next(data)])
    assert math.isfinite(loss.item())
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    scheduler_state = copy.deepcopy(trainer.lr_scheduler.state_dict())
    trainer.model.layers["1"].feed_forward.w2.weight.grad[0, 0] = bad
    expected = f"step 2: loss {loss.item()}, grad norm {bad}; the update was not applied"
    with pytest.raises(NonFiniteLossError, match=re.escape(expected)):
        trainer.optimizer_step(loss)
    for name, p in trainer.model.named_parameters():
        same, zeroed = torch.equal(p, weights[name]), p.grad is None
        assert same, f"{name} changed"
        assert zeroed, f"{name}'s gradient was not zeroed"
    _assert_same(trainer.optimizer.state_dict(), optimizer_state, "optimizer state")
    _assert_same(trainer.lr_scheduler.state_dict(), scheduler_state, "lr scheduler state")
