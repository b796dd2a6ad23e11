"""Offload against the same run without it: FSDP's CPU offload (parameters, gradients, optimizer
state) and activation offload (what blocks save for backward) give bitwise the same losses,
gradients and weights on CPU, offload what they should and nothing else, are traced by the dry
run as host memory apart from the device's peak, and stop start-up where they cannot apply."""

import pytest
import torch
import torch.distributed as dist
from dry_run_harness import dry_run
from parallel_harness import (
    BASE,
    DEBUG_TOML,
    ignore_some_labels,
    make_batches,
    run_layouts,
    run_single,
)
from torch.distributed.fsdp import CPUOffloadPolicy

from titan.config import load_config
from titan.errors import ConfigError
from titan.models.llama3.build import check_layout, model_args_for
from titan.parallelisms import offload
from titan.trainer.dry_run import trace_step
from titan.trainer.trainer import Trainer

STEPS, GLOBAL_BATCH = 3, 4
FSDP = ["--training.local_batch_size", "2"]  # dp_shard 2 on two ranks
FSDP_OFFLOAD = ["--parallelism.fsdp_cpu_offload", "true"]
ACT_OFFLOAD = ["--activation_checkpoint.offload", "true"]
TP = ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]
PP = ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_microbatch_size", "2"]  # fmt: skip
LAYER_AC = ["--activation_checkpoint.mode", "selective",
            "--activation_checkpoint.selective_ac_option", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def batches() -> tuple[torch.Tensor, torch.Tensor]:
    return ignore_some_labels(make_batches(STEPS, GLOBAL_BATCH))


def assert_bitwise(name: str, got: dict, ref: dict) -> None:
    assert got["losses"] == ref["losses"], f"{name}: losses {got['losses']} != {ref['losses']}"
    assert got["norms"] == ref["norms"], f"{name}: gradient norms differ"
    assert sorted(got["grads"]) == sorted(ref["grads"]) and sorted(got["params"]) == sorted(
        ref["params"]
    )
    for key in ref["grads"]:
        assert torch.equal(got["grads"][key], ref["grads"][key]), f"{name}: gradient of {key}"
    for key in ref["params"]:
        assert torch.equal(got["params"][key], ref["params"][key]), f"{name}: weight {key}"


def test_offload_is_bitwise_the_run_without(batches):
    """Two ranks, three AdamW steps, one launch. FSDP 2: each offload, both together, and
    activation offload of the blocks that every-2nd-block AC leaves, against FSDP 2 without
    offload; TP 2 (sequence parallel: DTensor activations) and PP 2 (1F1B, two micro-batches in
    flight) with activation offload against themselves without."""
    cases = {  # name: (overrides, the case it must equal bitwise)
        "fsdp": (FSDP, "fsdp"),
        "fsdp_cpu_offload": ([*FSDP, *FSDP_OFFLOAD], "fsdp"),
        "activation_offload": ([*FSDP, *ACT_OFFLOAD], "fsdp"),
        "both": ([*FSDP, *FSDP_OFFLOAD, *ACT_OFFLOAD], "fsdp"),
        "layer_ac_activation_offload": ([*FSDP, *LAYER_AC, *ACT_OFFLOAD], "fsdp"),
        "tp": (TP, "tp"),
        "tp_activation_offload": ([*TP, *ACT_OFFLOAD], "tp"),
        "pp": (PP, "pp"),
        "pp_activation_offload": ([*PP, *ACT_OFFLOAD], "pp"),
    }
    runs = run_layouts(2, [overrides for overrides, _ in cases.values()], batches)
    results = dict(zip(cases, runs, strict=True))
    for name, (_, reference) in cases.items():
        assert_bitwise(name, results[name], results[reference])
    assert results["layer_ac_activation_offload"]["layout"]["checkpointed_blocks"] == 3
    assert results["tp_activation_offload"]["layout"]["layout"] == "tp 2"
    assert results["pp_activation_offload"]["layout"]["stages"] == {0: [0], 1: [1]}


def test_activation_offload_copies_what_blocks_save_but_no_weight(batches, monkeypatch):
    """One process, bitwise the run without; the hooks copied what the blocks but the last saved
    (each tensor once), kept every weight and weight view on the device, and the backward read
    the copies back."""
    copies, kept, unpacked = [], [], [0]
    pack, unpack = offload._BlockOffload.pack, offload._BlockOffload.unpack

    def spy_pack(self, t):
        out = pack(self, t)
        (copies if isinstance(out, tuple) else kept).append((id(self), t.shape, out))
        return out

    def spy_unpack(packed):
        unpacked[0] += isinstance(packed, tuple)
        return unpack(packed)

    monkeypatch.setattr(offload._BlockOffload, "pack", spy_pack)
    monkeypatch.setattr(offload._BlockOffload, "unpack", staticmethod(spy_unpack))
    one = ["--training.local_batch_size", str(GLOBAL_BATCH)]
    got = run_single([*one, *ACT_OFFLOAD], batches, stop=1)
    n_copies, n_kept = len(copies), len(kept)
    assert_bitwise("activation offload", got, run_single(one, batches, stop=1))
    n_layers = got["layout"]["n_layers"]
    assert len({block for block, _, _ in copies}) == n_layers - 1  # not the last block
    assert n_copies == len(copies) and unpacked[0] == n_copies  # the reference ran no hooks
    weights = {tuple(p.shape) for p in got["params"].values() if p.ndim == 2}
    weights |= {s[::-1] for s in weights}
    assert not [s for _, s, _ in copies if tuple(s) in weights], "a weight was copied"
    # each offloaded block's 7 linears' transposed weights and 2 norm weights stayed
    assert sum(tuple(s) in weights for _, s, _ in kept) == 7 * (n_layers - 1)
    assert sum(isinstance(t, torch.nn.Parameter) for _, _, t in kept) == 2 * (n_layers - 1)
    assert n_kept == 9 * (n_layers - 1)
    # a tensor saved by several ops (the norm's output by wq, wk and wv) is copied once
    hosts = {id(out[1]) for _, _, out in copies}
    assert len(hosts) < n_copies


def _traced(monkeypatch, *overrides: str, world: int = 2):
    """A dry run's trace of rank 0 of `world` (debug model, FSDP), and its trainer."""
    monkeypatch.setenv("COMM_MODE", "fake_backend")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(["--job.config_file", DEBUG_TOML, *BASE, "--training.local_batch_size", "2",
                       "--training.seq_len", "96", *overrides])  # fmt: skip
    trainer = Trainer(cfg)
    try:
        return trace_step(trainer, 0, "rank 0"), trainer
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_dry_run_traces_fsdp_cpu_offload_as_host_memory(monkeypatch, param_dtype):
    """The shards, their gradients and the optimizer state leave the device's peak and are
    reported as host memory, byte for byte what the run without offload holds on the device
    (fp32 gathers too, where FSDP's copy into the all-gather reads the host shards themselves);
    FSDP really got the (unpinned, on CPU) offload policy."""
    dtype = ["--training.mixed_precision_param", param_dtype]
    off, _ = _traced(monkeypatch, *dtype)
    on, trainer = _traced(monkeypatch, *dtype, *FSDP_OFFLOAD)
    for block in trainer.model.layers.values():
        policy = block._get_fsdp_state()._fsdp_param_group.offload_policy
        assert isinstance(policy, CPUOffloadPolicy) and not policy.pin_memory
    assert not off.host
    # on the device at most the gradients of the block being reduced, not yet sharded
    assert on.peak["parameters"] == on.peak["optimizer state"] == 0
    assert on.host["parameters"] == off.held["parameters"] > 0
    assert on.host["optimizer state"] == off.held["optimizer state"] > 0
    assert on.host["gradients"] == on.held["gradients"] == off.held["gradients"] > 0
    # at every moment the device holds what it held without offload, less the shards, the
    # optimizer state and the gradients made so far (with those, the peak may come later)
    assert on.total <= off.total - off.held["parameters"] - off.held["optimizer state"]
    assert on.peak["activations"] >= off.peak["activations"]


@pytest.mark.parametrize("tp", [1, 2])
def test_dry_run_traces_activation_offload_as_host_memory(monkeypatch, tp):
    """The host copies are host memory (exactly the bytes the hooks copied), not the device's:
    the device's activations at the peak fall by more than half of them. FSDP's gathered
    weights (bf16, whole; TP's shards of them) are never copied; with TP 2, sequence-parallel
    DTensor activations are copied as their local shards."""
    copied, shapes, dtensors = {}, set(), [0]
    pack = offload._BlockOffload.pack

    def spy_pack(self, t):
        out = pack(self, t)
        if isinstance(out, tuple):
            copied[id(out[1])] = out[1].untyped_storage().nbytes()
            shapes.add(tuple(out[1].shape))
            dtensors[0] += out[2] is not None
        return out

    layout = ["--parallelism.tensor_parallel_degree", str(tp)]
    off, _ = _traced(monkeypatch, *layout, world=2 * tp)
    monkeypatch.setattr(offload._BlockOffload, "pack", spy_pack)
    on, trainer = _traced(monkeypatch, *layout, *ACT_OFFLOAD, world=2 * tp)
    assert on.host == {"activations": sum(copied.values())} and copied
    assert (dtensors[0] > 0) == (tp > 1)
    weights = {tuple(p.shape) for p in trainer.model.state_dict().values() if p.ndim == 2}
    weights |= {(a // tp, b) for a, b in weights} | {(a, b // tp) for a, b in weights}
    assert not shapes & (weights | {s[::-1] for s in weights}), "a gathered weight was copied"
    saved = off.peak["activations"] - on.peak["activations"]
    assert saved > on.host["activations"] / 2, (off.peak, on.peak, on.host)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--activation_checkpoint.mode", "full"], "mode = 'full' has nothing to offload"),
        (["--activation_checkpoint.mode", "selective"], r"'selective' \(op-level\) has nothing"),
        (["--activation_checkpoint.mode", "memory_budget", "--compile.enable", "true"],
         "compile's partitioner"),
        (["--compile.enable", "true"], "torch.compile cannot trace the saved-tensor hooks"),
        (["--parallelism.tensor_parallel_degree", "2",
          "--parallelism.data_parallel_shard_degree", "1"], "applies no FSDP"),
    ],
)  # fmt: skip
def test_offload_stops_start_up_where_it_cannot_apply(overrides, message):
    cfg = load_config(["--job.config_file", DEBUG_TOML, *BASE, *ACT_OFFLOAD, *FSDP_OFFLOAD,
                       *overrides])  # fmt: skip
    args = model_args_for(cfg.model, cfg.training.seq_len, 0)
    with pytest.raises(ConfigError, match=message):
        check_layout(cfg, args, torch.device("cpu"), 2)


def test_offload_is_accepted_where_it_applies():
    """On CPU too (the CPU runs above; a dry run of a GPU config), with every-N-th-block AC."""
    cfg = load_config(["--job.config_file", DEBUG_TOML, *BASE, *ACT_OFFLOAD, *FSDP_OFFLOAD,
                       *LAYER_AC])  # fmt: skip
    args = model_args_for(cfg.model, cfg.training.seq_len, 0)
    assert check_layout(cfg, args, torch.device("cpu"), 2).fsdp_enabled


def test_traced_offload_allocates_what_the_real_step_allocates(tmp_path):
    """Both offloads on FSDP 2 x TP 2, traced on fake tensors and on real ones (really computed,
    the fake process group): the device's parts at the peak and the host's agree to the byte."""
    args = ("--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "128",
            *FSDP_OFFLOAD, *ACT_OFFLOAD)  # fmt: skip
    _, fake = dry_run(tmp_path / "fake", *args, ngpu=4)
    _, real = dry_run(tmp_path / "real", *args, ngpu=4, TITAN_DRY_RUN_REAL="1")
    (fake,), (real,) = fake["ranks"], real["ranks"]
    assert fake["peak"] == real["peak"] and fake["host"] == real["host"]
    assert fake["host"]["activations"] > 0 and fake["host"]["gradients"] > 0
    assert fake["peak"]["parameters"] == fake["peak"]["optimizer state"] == 0
