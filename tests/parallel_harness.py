"""Run titan's Trainer in several fork-started CPU/gloo processes and in one, on the same batches.

`train_case(overrides, batches, stop)` builds a Trainer from the debug config plus overrides,
feeds each data-parallel rank its rows of the global batches from the step it resumed at (with
[checkpoint] enabled, saving as configured) up to `stop` (default: all), and returns (from
rank 0) the loss and gradient norm of every step it ran, every full gradient of its first step,
every full parameter at the end, and `layout`: what the transforms really did (meshes, parameter
placements, FSDP resharding, activation placements, loss parallel, compiled-graph runs), so a
test can check that a layout was applied and not only that its numbers agree.
`run_layouts(world_size, cases, batches)` runs many cases, one after the other, in one launch of
world_size processes (a case is its overrides, or (overrides, stop)); `run_single(overrides,
batches, stop)` is the one-process reference. `batches` is a token tensor (steps, global_batch,
seq_len + 1), or a pair (inputs, labels) of (steps, global_batch, seq_len) tensors whose labels
may hold IGNORE_INDEX. `assert_matches` compares a case with the reference, each tensor relative
to its own scale.
"""

import functools
import importlib.util
import multiprocessing
import os
import pickle
import socket
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._composable.replicate import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from titan.config import load_config
from titan.trainer.loss import IGNORE_INDEX
from titan.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(REPO / "titan/train_configs" / "debug_model.toml")
# Small and quick: the debug model on 32-token sequences of synthetic data, no logging. The LR is
# small because Adam turns 1e-8 rounding differences of near-zero gradients into updates of up to
# lr; at 1e-3 three steps of FSDP x TP drift 1.6e-5 from one process, at 1e-4 under 2e-6.
BASE = [
    "--training.seq_len", "32", "--data.dataset", "synthetic", "--lr_scheduler.warmup_steps", "0",
    "--metrics.log_freq", "1000", "--optimizer.lr", "1e-4", "--training.device", "cpu",
]  # fmt: skip
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

# Tolerances, fp32. Losses (~8) to 1e-5 absolute. Gradients and gradient norms relative to their
# own scale: a gradient's largest values may be 5e-5 and a fifth of them below 1e-5, so an
# absolute 1e-5 would pass a gradient 15% off. Measured layout errors are ~1e-7 relative.
LOSS_ATOL = 1e-5
REL_TOL = 1e-5

# A compile backend that is inductor plus a count of the compiled forward graphs that ran, so a
# test sees that each block really went through compiled code (a no-op compile shows as 0 runs).
COUNTING_BACKEND = "titan_test_counting_inductor"
_GRAPH_RUNS = [0]


def _counting_inductor(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(gm, example_inputs)

    def run(*args):
        _GRAPH_RUNS[0] += 1
        return compiled(*args)

    return run


torch._dynamo.register_backend(_counting_inductor, name=COUNTING_BACKEND)


def compiled_graph_runs() -> int:
    """Forward graphs compiled by COUNTING_BACKEND that have run in this process so far."""
    return _GRAPH_RUNS[0]


def make_batches(steps: int, global_batch: int, seq_len: int = 32, vocab: int = 2304, seed=1):
    """(steps, global_batch, seq_len + 1) token ids: rows of inputs and shifted labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, global_batch, seq_len + 1), generator=g)


def ignore_some_labels(tokens: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from tokens, each row's labels ignored (IGNORE_INDEX) from a random
    position on: 0 to seq_len - 1 targets kept, so rows, micro-batches and ranks all count
    different numbers of targets, and some rows count none."""
    inputs, labels = tokens[..., :-1], tokens[..., 1:].clone()
    steps, rows, seq_len = labels.shape
    g = torch.Generator().manual_seed(seed)
    keep = torch.randint(0, seq_len, (steps, rows, 1), generator=g)
    keep[:, 0] = 0  # the first row of every step carries no target at all
    labels[torch.arange(seq_len).expand_as(labels) >= keep] = IGNORE_INDEX
    return inputs, labels


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _placement(t: torch.Tensor) -> tuple | None:
    """(mesh dim names, placements as R / S(dim) / P) of a DTensor, None for a plain tensor.
    FSDP's shard of a dim that TP already shards (torch's _StridedShard) is written S(dim) too."""
    if not isinstance(t, DTensor):
        return None
    names = []
    for p in t.placements:
        names.append("R" if p.is_replicate() else "P" if p.is_partial() else f"S({p.dim})")
    return t.device_mesh.mesh_dim_names, tuple(names)


def _record_activations(trainer: Trainer) -> tuple[dict, list]:
    """Hooks that record, on the first forward, the final norm's output (sequence parallel
    shards it on the sequence) and the logits (loss parallel shards them on the vocabulary)."""
    seen: dict = {}

    def hook(key):
        def record(_module, _inputs, output):
            if key not in seen:
                local = output.to_local() if isinstance(output, DTensor) else output
                seen[key] = {"placement": _placement(output), "local_shape": tuple(local.shape)}

        return record

    model = trainer.model
    handles = []
    if model.output is not None:  # a pipeline rank without the last stage has neither
        handles.append(model.norm.register_forward_hook(hook("norm_out")))
        handles.append(model.output.register_forward_hook(hook("logits")))
    return seen, handles


def describe_layout(trainer: Trainer) -> dict:
    """What was applied to this rank's part of the model: meshes, each parameter's placement,
    the FSDP units and whether they reshard after forward, the data-parallel wrapper of the
    root (fsdp, ddp), pipeline stages (the root of stage i is "stage i")."""
    model, parts = trainer.model, trainer.model_parts
    stage_ids = getattr(trainer, "stage_ids", None)
    reshard = {}
    for i, part in enumerate(parts):
        root = "root" if stage_ids is None else f"stage {stage_ids[i]}"
        for name, module in part.named_modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is None:  # a stage's root that holds no parameters of its own
                    continue
                # torch keeps a post-forward mesh exactly when the unit reshards after forward
                reshard[_clean(name) or root] = group.post_forward_mesh_info is not None
    wrapped = {
        "fsdp" if isinstance(part, FSDPModule)
        else "ddp" if replicate.state(part) is not None
        else None
        for part in parts
    }  # fmt: skip
    assert len(wrapped) == 1, f"stages wrapped differently: {wrapped}"
    return {
        "layout": trainer.parallel_dims.describe(),
        "meshes": {k: (m.mesh_dim_names, tuple(m.shape)) for k, m in trainer.meshes.items()},
        "placements": {_clean(n): _placement(p) for n, p in model.named_parameters()},
        "reshard_after_forward": reshard,
        "data_parallel": wrapped.pop(),
        "loss_parallel": trainer.loss_parallel,
        "n_layers": trainer.model_args.n_layers,
        "checkpointed_blocks": sum(isinstance(b, CheckpointWrapper) for b in model.layers.values()),
        "stages": {trainer.pp_mesh.get_local_rank(): stage_ids} if stage_ids is not None else {},
        "graph_runs_per_block_and_pipeline_micro_batch": {},
        "linears": _linear_precision(trainer),
        # attention modules that see the context-parallel ranks' keys and values, by how
        "context_parallel_attention": {
            "ring": sum(b.attention.ring_attention is not None for b in model.layers.values()),
            "gather": sum(b.attention.context_gather is not None for b in model.layers.values()),
        },
    }


def _linear_precision(trainer: Trainer) -> dict[str, str]:
    """Each linear's matmul precision: "float8" (torchao Float8Linear; "float8 all-gather" when
    FSDP gathers its weight in float8), "mx" (an MXFP8 training weight), "nvfp4" or "high"."""
    if not trainer.cfg.model.converters:
        return {}
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from titan.converters.mx import is_mx_linear
    from titan.converters.nvfp4 import NVFP4Linear

    kinds = {}
    for part in trainer.model_parts:
        for name, m in part.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            kind = (
                "float8" if isinstance(m, Float8Linear)
                else "mx" if is_mx_linear(m)
                else "nvfp4" if isinstance(m, NVFP4Linear)
                else "high"
            )  # fmt: skip
            local = m.weight.to_local() if isinstance(m.weight, DTensor) else m.weight
            if isinstance(local, WeightWithDynamicFloat8CastTensor):
                kind += " all-gather"
            kinds[_clean(name)] = kind
    return kinds


def merge_ranks(results: list[dict]) -> dict:
    """One case's results from every rank as one: losses from rank 0 (every rank has the step's
    loss), gradients, parameters and layout facts of all pipeline stages together."""
    merged = results[0]
    for other in results[1:]:
        for key in ("grads", "params"):
            for name, t in other[key].items():
                merged[key].setdefault(name, t)
        layout, more = merged["layout"], other["layout"]
        for key in (
            "placements", "reshard_after_forward", "stages", "linears",
            "graph_runs_per_block_and_pipeline_micro_batch",
        ):  # fmt: skip
            for name, value in more[key].items():
                layout[key].setdefault(name, value)
        layout["checkpointed_blocks"] = max(
            layout["checkpointed_blocks"], more["checkpointed_blocks"]
        )
        for name, value in more.get("activations", {}).items():
            layout.setdefault("activations", {}).setdefault(name, value)
    return merged


def _inputs_and_labels(batches) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        return batches[..., :-1], batches[..., 1:]
    return batches


def train_case(overrides: list[str], batches, stop: int | None = None) -> dict:
    cfg = load_config(["--job.config_file", DEBUG_TOML, *BASE, *overrides])
    trainer = Trainer(cfg)
    n_dp, dp_rank = trainer.parallel_dims.dp, trainer.dp_rank
    inputs, labels = _inputs_and_labels(batches)
    local = inputs.shape[1] // n_dp
    per_micro = cfg.training.local_batch_size
    losses, norms, grads = [], [], {}
    layout = describe_layout(trainer)
    activations, handles = _record_activations(trainer)
    start = trainer.step  # > 0 when the Trainer resumed from a checkpoint
    last = len(inputs) if stop is None else stop
    validation = []  # (step, loss, targets) of each validation ([validation] enabled)
    for step in range(start, last):
        rows = slice(dp_rank * local, (dp_rank + 1) * local)
        micro = list(
            zip(
                inputs[step][rows].split(per_micro),
                labels[step][rows].split(per_micro),
                strict=True,
            )
        )
        assert len(micro) == trainer.grad_accum_steps
        runs_before = compiled_graph_runs()
        loss = trainer.forward_backward(micro)
        if step == start:
            runs = compiled_graph_runs() - runs_before
            layout["graph_runs_per_micro_batch"] = runs / len(micro)
            if trainer.pp_mesh is not None:
                p = cfg.parallelism
                pipelined = cfg.training.local_batch_size // p.pipeline_parallel_microbatch_size
                per_block = runs / (len(trainer.model.layers) * pipelined * len(micro))
                pp_rank = trainer.pp_mesh.get_local_rank()
                layout["graph_runs_per_block_and_pipeline_micro_batch"] = {pp_rank: per_block}
            for h in handles:
                h.remove()
            layout["activations"] = activations
            for name, p in trainer.model.named_parameters():
                if p.grad is not None:  # frozen parameters (LoRA's base) have none
                    grads[_clean(name)] = _full(p.grad)
        loss_value, norm = trainer.optimizer_step(loss)
        losses.append(loss_value)
        norms.append(norm)
        trainer.step = step + 1
        if trainer.validator is not None and trainer.validator.due(trainer.step, last):
            validation.append((trainer.step, *trainer.validate()))
        if trainer.checkpointer is not None:
            trainer.checkpointer.maybe_save(trainer.step, last_step=False)
    if trainer.checkpointer is not None:
        trainer.checkpointer.close()
    params = {_clean(n): _full(p) for n, p in trainer.model.named_parameters()}
    return {
        "start": start, "losses": losses, "norms": norms, "grads": grads, "params": params,
        "layout": layout, "validation": validation,
    }  # fmt: skip


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(|got - ref| / |ref| in L2, max |got - ref| / max |ref|): both relative to ref's scale."""
    got, ref = got.double(), ref.double()
    scale_l2, scale_max = ref.norm().item(), ref.abs().max().item()
    diff = got - ref
    if scale_l2 == 0:  # an all-zero reference: any nonzero value is an error
        return diff.norm().item(), diff.abs().max().item()
    return diff.norm().item() / scale_l2, diff.abs().max().item() / scale_max


def assert_tensor_matches(what: str, got: torch.Tensor, ref: torch.Tensor, tol=REL_TOL) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    l2, worst = rel_error(got, ref)
    assert l2 <= tol and worst <= tol, (
        f"{what}: relative L2 error {l2:.2e}, largest element error {worst:.2e} of the largest "
        f"value (tolerance {tol:.0e})"
    )


def assert_matches(name: str, got: dict, ref: dict) -> None:
    """Losses within LOSS_ATOL; gradient norms and every gradient within REL_TOL of their own
    scale (relative L2 error, and the largest element error relative to the largest value)."""
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=LOSS_ATOL, rtol=0,
        msg=lambda m: f"{name}: losses differ from one process\n{m}",
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(got["norms"], dtype=torch.float64),
        torch.tensor(ref["norms"], dtype=torch.float64), atol=0, rtol=REL_TOL,
        msg=lambda m: f"{name}: gradient norms differ\n{m}",
    )  # fmt: skip
    assert sorted(got["grads"]) == sorted(ref["grads"]), f"{name}: parameter names differ"
    for key, grad in ref["grads"].items():
        assert_tensor_matches(f"{name}: gradient of {key}", got["grads"][key], grad)


@functools.cache
def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    every_rank = [None] * world_size if rank == 0 else None
    dist.gather_object(results, every_rank, dst=0)
    if rank == 0:
        merged = [merge_ranks([ranks[i] for ranks in every_rank]) for i in range(len(cases))]
        Path(out_dir, "results.pkl").write_bytes(pickle.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


def run_layouts(world_size: int, cases: list, batches) -> list[dict]:
    """Each case's results (every rank's merged), all cases run in one launch of world_size
    processes."""
    # Workers fork from a server process that has imported titan and nothing else: forked from
    # pytest itself they inherit whatever earlier tests left running (tqdm monitors, pyarrow's
    # jemalloc thread, compile pools), and a CI run once segfaulted and hung that way.
    multiprocessing.set_forkserver_preload(["parallel_harness"])
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(world_size, _free_port(), cases, batches, out), nprocs=world_size,
            start_method="forkserver",
        )  # fmt: skip
        return pickle.loads(Path(out, "results.pkl").read_bytes())


def run_single(overrides: list[str], batches, stop: int | None = None) -> dict:
    """The one-process reference (no process group)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "COMM_MODE"):
        os.environ.pop(key, None)
    return train_case(overrides, batches, stop)
