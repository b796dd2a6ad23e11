"""Checkpointing: exact resume against an uninterrupted run, atomic saves, bad checkpoints,
parts excluded from loading, the model-only last save, seed checkpoints and starting from
Hugging Face weights."""

import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan.checkpoint.checkpointer import complete_steps
from titan.config import load_config
from titan.errors import CheckpointError
from titan.models.llama3.hf_io import save_hf_checkpoint
from titan.train import main
from titan.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs/debug_model.toml")
STEPS = 6


class Interrupted(Exception):
    pass


def make_trainer(dump: Path, *overrides: str) -> Trainer:
    args = [
        "--job.dump_folder", str(dump), "--training.device", "cpu", "--training.steps", str(STEPS),
        "--training.seq_len", "32", "--training.local_batch_size", "2", "--metrics.log_freq", "100",
        "--checkpoint.interval", "3", "--checkpoint.last_save_model_only", "false", *overrides,
    ]  # fmt: skip
    return Trainer(load_config(args, config_file=DEBUG_TOML))


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name, p in sa.items():
        assert torch.equal(p, sb[name]), name


def crash_after(trainer: Trainer, step: int) -> None:
    """Make the trainer die before applying step `step + 1`, as a killed job would."""
    original = trainer.train_step

    def train_step(microbatches):
        if trainer.step > step:
            raise Interrupted
        return original(microbatches)

    trainer.train_step = train_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    return make_trainer(tmp_path_factory.mktemp("full")).train()


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_resume_is_exact(tmp_path, uninterrupted, mode):
    first = make_trainer(tmp_path, "--checkpoint.enable", "--checkpoint.async_mode", mode)
    crash_after(first, 4)  # step-3 is saved, steps 4 and the start of 5 are lost
    with pytest.raises(Interrupted):
        first.train()
    first.checkpointer.close()
    assert complete_steps(tmp_path / "checkpoint") == [3]
    resumed = make_trainer(tmp_path, "--checkpoint.enable", "--checkpoint.async_mode", mode)
    assert resumed.step == 3
    assert resumed.train() == uninterrupted[3:]  # bitwise: same weights, optimizer, LR, data
    assert complete_steps(tmp_path / "checkpoint") == [3, 6]


def test_resume_across_a_batch_size_ramp_is_exact(tmp_path):
    """The global batch doubles after 192 tokens (6 windows of 32: steps 1-3 read 2 windows,
    steps 4-6 read 4 in 2 micro-batches); a run killed after step 4 resumes from step 3, before
    the ramp, into the bigger batch: the uninterrupted losses, bitwise."""
    ramp = ("--training.batch_size_schedule", "192 4")
    whole = make_trainer(tmp_path / "whole", *ramp)
    losses = whole.train()
    assert whole.grad_accum_steps == 2 and whole.dataloader.consumed == 3 * 2 + 3 * 4
    first = make_trainer(tmp_path, "--checkpoint.enable", *ramp)
    crash_after(first, 4)
    with pytest.raises(Interrupted):
        first.train()
    resumed = make_trainer(tmp_path, "--checkpoint.enable", *ramp)
    assert resumed.step == 3 and resumed.grad_accum_steps == 2
    assert resumed.train() == losses[3:]


def test_partial_save_is_ignored_and_keep_latest_k(tmp_path):
    trainer = make_trainer(
        tmp_path,
        "--checkpoint.enable",
        "--checkpoint.interval",
        "1",
        "--checkpoint.keep_latest_k",
        "2",
    )
    trainer.train()
    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [5, 6]
    # a save killed midway leaves step-N.partial: it is never loaded
    shutil.copytree(folder / "step-6", folder / "step-9.partial")
    assert make_trainer(tmp_path, "--checkpoint.enable").step == 6


def truncate_a_data_file(step_dir: Path) -> Path:
    data_file = sorted(step_dir.glob("*.distcp"))[0]
    data_file.write_bytes(data_file.read_bytes()[:100])
    return data_file


def test_truncated_checkpoint_names_file_and_latest_falls_back(tmp_path):
    make_trainer(tmp_path, "--checkpoint.enable").train()
    folder = tmp_path / "checkpoint"
    bad = truncate_a_data_file(folder / "step-6")
    match = rf"step 6: {re.escape(str(bad))} is truncated: 100 bytes, the metadata needs \d+"
    with pytest.raises(CheckpointError, match=match):
        make_trainer(tmp_path, "--checkpoint.enable", "--checkpoint.load_step", "6")
    assert complete_steps(folder) == [3, 6]  # a named step is never set aside
    with pytest.raises(CheckpointError, match=r"load_step = 4: no complete checkpoint step-4"):
        make_trainer(tmp_path, "--checkpoint.enable", "--checkpoint.load_step", "4")
    # load_step = -1 takes the newest whole checkpoint and keeps the broken one aside
    assert make_trainer(tmp_path, "--checkpoint.enable").step == 3
    assert complete_steps(folder) == [3]
    assert (folder / "step-6.corrupt" / bad.name).stat().st_size == 100


def test_no_whole_checkpoint_is_an_error_that_renames_nothing(tmp_path):
    make_trainer(tmp_path, "--checkpoint.enable").train()
    folder = tmp_path / "checkpoint"
    (folder / "step-6" / ".metadata").unlink()
    bad = truncate_a_data_file(folder / "step-3")
    match = rf"step 6: .*step-6 is not a DCP checkpoint: it has no .metadata.*step 3: .*{bad.name}"
    for _ in range(2):  # the same answer every time: nothing was moved
        with pytest.raises(CheckpointError, match=match):
            make_trainer(tmp_path, "--checkpoint.enable")
    assert complete_steps(folder) == [3, 6]


def test_corrupt_contents_and_other_shapes_are_named(tmp_path):
    make_trainer(tmp_path, "--checkpoint.enable").train()
    step_dir = tmp_path / "checkpoint" / "step-6"
    # overwrite the pickled data-loader position in place: sizes stay right, the bytes do not
    storage = dcp.FileSystemReader(str(step_dir)).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn.startswith("dataloader."))
    with open(step_dir / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * info.length)
    # unverified (checksums off, or an older titan's checkpoint): DCP's read fails, named
    # (with checksums the change is caught before reading: tests/test_checksums.py)
    with pytest.raises(CheckpointError, match=r"checkpoint step 6 at .*step-6 cannot be loaded"):
        make_trainer(tmp_path, "--checkpoint.enable", "--checkpoint.checksums", "false")
    # a checkpoint of another model: the weights' shapes are compared before anything is read
    with pytest.raises(CheckpointError, match=r"step-3 does not fit the model.*tok_embeddings"):
        make_trainer(
            tmp_path, "--checkpoint.enable", "--checkpoint.load_step", "3", "--model.vocab_size",
            "4096",
        )  # fmt: skip


def same_state(a: Any, b: Any) -> bool:
    """Exact equality of nested state dicts holding tensors (dtype included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        same_keys = isinstance(b, dict) and a.keys() == b.keys()
        return same_keys and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


def loadable_parts(trainer: Trainer) -> dict[str, Any]:
    """What a resume restores of each part exclude_from_loading can name. train_state: the
    process's CPU RNG, so call this right after building the trainer (the step is the folder's)."""
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "dataloader": trainer.dataloader.state_dict(),
        "train_state": torch.get_rng_state(),
    }


@pytest.fixture(scope="module")
def step_3(tmp_path_factory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A run's dump folder with step-3 and step-6, and the parts as a fresh start and a full
    resume from step 3 hold them."""
    dump = tmp_path_factory.mktemp("step_3")
    trainer = make_trainer(dump, "--checkpoint.enable")
    torch.rand(1)  # training draws nothing from the CPU RNG: advance it so its restore shows
    trainer.train()
    fresh = loadable_parts(make_trainer(dump / "fresh"))
    resume = ("--checkpoint.enable", "--checkpoint.load_step", "3")
    resumed = loadable_parts(make_trainer(dump, *resume))
    for part in fresh:  # the two differ in every part, so each comparison below can tell
        assert not same_state(fresh[part], resumed[part]), part
    return dump, fresh, resumed


# several items in one comma-separated override
@pytest.mark.parametrize("excluded", ["optimizer,lr_scheduler", "model,dataloader,train_state"])
def test_exclude_from_loading_leaves_those_parts_fresh(step_3, excluded):
    dump, fresh, resumed = step_3
    resume = ("--checkpoint.enable", "--checkpoint.load_step", "3")
    trainer = make_trainer(dump, *resume, "--checkpoint.exclude_from_loading", excluded)
    assert trainer.cfg.checkpoint.exclude_from_loading == excluded.split(",")
    assert trainer.step == 3
    got = loadable_parts(trainer)
    for part, state in got.items():
        want = fresh if part in excluded.split(",") else resumed
        assert same_state(state, want[part]), f"{part} (excluded: {excluded})"


def test_a_stream_position_resumes_all_but_the_data_position(tmp_path, step_3, caplog):
    """A checkpoint whose data position belongs to a streamed source's shard (rank 0 of 2)
    resumes everything else; the data starts from the beginning, with a warning."""
    fresh_data = step_3[1]["dataloader"]
    saver = make_trainer(tmp_path, "--checkpoint.enable", "--training.steps", "3")
    saver.checkpointer.dp_key = "dp0_of_2"  # the key rank 0 of a 2-way streamed run saves
    saver.train()
    with caplog.at_level(logging.WARNING, logger="titan"):
        resumed = make_trainer(tmp_path, "--checkpoint.enable", "--training.steps", "3")
    assert "no data position for global" in caplog.text
    got, saved = loadable_parts(resumed), loadable_parts(saver)
    assert same_state(got["dataloader"], fresh_data), "the data should start from the beginning"
    for part in ("model", "optimizer", "lr_scheduler"):  # train_state: one process-wide RNG
        assert same_state(got[part], saved[part]), part


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_last_save_is_model_only_in_export_dtype(tmp_path, name):
    dtype = getattr(torch, name)
    trainer = make_trainer(
        tmp_path, "--checkpoint.enable", "--checkpoint.last_save_model_only", "true",
        "--checkpoint.export_dtype", name,
    )  # fmt: skip
    trainer.train()
    trained = trainer.model.state_dict()  # fp32
    folder = tmp_path / "checkpoint"
    interval_save = dcp.FileSystemReader(str(folder / "step-3")).read_metadata()
    assert any(k.startswith("optimizer.") for k in interval_save.state_dict_metadata)
    stored = dcp.FileSystemReader(str(folder / "step-6")).read_metadata().state_dict_metadata
    assert stored.keys() == trained.keys()  # weights only: no optimizer, schedule, data, step
    assert {k: m.properties.dtype for k, m in stored.items()} == dict.fromkeys(trained, dtype)
    # read back into fp32: exactly the trained fp32 weights rounded to the export dtype
    back = {k: torch.empty_like(v) for k, v in trained.items()}
    dcp.load(back, checkpoint_id=str(folder / "step-6"), no_dist=True)
    for k, w in trained.items():
        assert torch.equal(back[k], w.to(dtype).float()), k
    if dtype != torch.float32:  # the rounding is visible: not the fp32 values themselves
        assert not all(torch.equal(back[k], w) for k, w in trained.items())


def test_seed_checkpoint_gives_identical_start(tmp_path):
    seed_dump = tmp_path / "seed"
    args = ["--job.config_file", DEBUG_TOML, "--job.dump_folder", str(seed_dump),
            "--training.device", "cpu", "--training.seed", "7",
            "--checkpoint.create_seed_checkpoint"]  # fmt: skip
    assert main(args) == 0
    assert complete_steps(seed_dump / "checkpoint") == [0]
    seeded = make_trainer(seed_dump, "--checkpoint.enable")  # default seed 0, weights from seed 7
    reference = make_trainer(tmp_path / "ref", "--training.seed", "7")
    assert_same_weights(seeded, reference)
    assert seeded.step == 0


def test_initial_load_from_hf(tmp_path):
    source = make_trainer(tmp_path / "src", "--training.seed", "3")
    hf_dir = tmp_path / "hf"
    save_hf_checkpoint(source.model.state_dict(), source.model_args, hf_dir, dtype=torch.float32)
    started = make_trainer(
        tmp_path / "run",
        "--checkpoint.initial_load_path",
        str(hf_dir),
        "--checkpoint.initial_load_in_hf",
    )
    assert_same_weights(started, source)


# Runs titan in a child whose DCP writer stalls on step 4's save, so the parent can SIGKILL it
# while that asynchronous save is in flight.
_STALLING_CHILD = """
import sys, time
from torch.distributed.checkpoint.filesystem import FileSystemWriter
write_data = FileSystemWriter.write_data
def stalling_write(self, plan, planner):
    if "step-4" in str(self.path):
        print("WRITING step-4", flush=True)
        time.sleep(120)
    return write_data(self, plan, planner)
FileSystemWriter.write_data = stalling_write
from titan.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_async_save_resumes_from_previous(tmp_path):
    args = [
        "--job.config_file", DEBUG_TOML, "--job.dump_folder", str(tmp_path),
        "--training.device", "cpu", "--training.steps", "8", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--checkpoint.async_mode", "async",
    ]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLING_CHILD, *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for line in child.stdout:
            if "WRITING step-4" in line:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    folder = tmp_path / "checkpoint"
    assert (folder / "step-4.partial").is_dir()
    assert complete_steps(folder) == [2]
    resumed = Trainer(load_config(args[2:], config_file=DEBUG_TOML))
    assert resumed.step == 2


def test_resume_with_bf16_moments_is_exact(tmp_path):
    """Adam's moments in bf16 (optimizer.state_dtype) save and load as they are: a run killed
    after step 4 resumes from step 3 into the uninterrupted losses, bitwise."""
    bf16 = ("--optimizer.state_dtype", "bfloat16")
    losses = make_trainer(tmp_path / "whole", *bf16).train()
    first = make_trainer(tmp_path, "--checkpoint.enable", *bf16)
    crash_after(first, 4)
    with pytest.raises(Interrupted):
        first.train()
    first.checkpointer.close()
    resumed = make_trainer(tmp_path, "--checkpoint.enable", *bf16)
    state = resumed.optimizer.state[next(resumed.model.parameters())]
    assert resumed.step == 3 and state["exp_avg"].dtype == torch.bfloat16
    assert resumed.train() == losses[3:]


def test_resume_with_muon_is_exact(tmp_path):
    """Muon's momentum on the blocks' matrices and AdamW's moments on the rest save and load
    (the two optimizers' shared groups and state re-linked after the load): a run killed after
    step 4 resumes from step 3 into the uninterrupted losses, bitwise."""
    muon = ("--optimizer.name", "Muon")
    losses = make_trainer(tmp_path / "whole", *muon).train()
    first = make_trainer(tmp_path, "--checkpoint.enable", *muon)
    crash_after(first, 4)
    with pytest.raises(Interrupted):
        first.train()
    first.checkpointer.close()
    resumed = make_trainer(tmp_path, "--checkpoint.enable", *muon)
    opt = resumed.optimizer
    wq = resumed.model.layers["0"].attention.wq.weight
    assert resumed.step == 3 and set(opt.state[wq]) == {"momentum_buffer"}
    assert opt.muon.state is opt.state and opt.muon.param_groups[0] is opt.param_groups[0]
    assert resumed.train() == losses[3:]
