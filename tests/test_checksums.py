"""Checkpoint checksums: a changed byte in any file is found, named, and treated like a truncated
file (the newest whole checkpoint is taken, or an explicit load_step fails); the offline
command titan-verify-checkpoint; checkpoints without checksums load as before."""

import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from parallel_harness import _free_port
from test_checkpoint import make_trainer
from torch import nn

from titan.checkpoint.checkpointer import CheckpointManager, complete_steps
from titan.checkpoint.checksums import MANIFEST, read_manifest
from titan.cli.verify_checkpoint import check_folder, main
from titan.config.job_config import Checkpoint
from titan.errors import CheckpointError

WORLD = 4
STEPS = 4  # 4 saves of .metadata + one file per rank: 20 files


def flip_a_byte(path: Path, rng: random.Random) -> tuple[int, int]:
    """Change one random byte of `path` in place (same length); returns (offset, old byte)."""
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    old = data[offset]
    data[offset] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return offset, old


def restore_byte(path: Path, offset: int, old: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([old]))


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file the saves wrote in folder's step-N folders, but the manifests themselves."""
    return sorted(p for p in folder.glob("step-*/*") if p.name != MANIFEST)


class _Data:
    """A loader whose position is saved per rank, so that every rank writes a file of its own."""

    def __init__(self, rank: int):
        self.state_key, self.position = f"dp{rank}_of_{WORLD}", rank

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _worker(rank: int, port: int, dump: str, out: str) -> None:
    """Save STEPS checkpoints (sync and async) from WORLD ranks; then for each file in turn
    change a byte and load its step through the loader; last, resume with load_step = -1 with a
    changed file in the newest. Writes what each load said to out/rank.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="localhost")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a collective that some rank never joins fails the test after a minute instead of hanging
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = Checkpoint(enable=True, interval=1, last_save_model_only=False)
    manager = CheckpointManager(
        cfg, dump, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=_Data(rank)
    )
    for step in range(1, STEPS + 1):
        cfg.async_mode = "async" if step % 2 else "disabled"
        manager.maybe_save(step, last_step=step == STEPS)
    manager.close()
    folder = Path(dump) / cfg.folder
    said = {"clean": manager.load(), "files": [], "errors": []}
    rng = random.Random(0)
    for file in checkpoint_files(folder):
        if rank == 0:
            changed = flip_a_byte(file, rng)
        dist.barrier()  # the byte is changed before any rank verifies
        cfg.load_step = int(file.parent.name.removeprefix("step-"))
        try:
            manager.load()
            said["errors"].append(None)
        except CheckpointError as e:
            said["errors"].append(str(e))
        said["files"].append(str(file))
        dist.barrier()  # every rank verified before the byte is put back
        if rank == 0:
            restore_byte(file, *changed)
    dist.barrier()
    if rank == 0:  # the test puts the byte back to verify the folder offline
        said["changed"] = flip_a_byte(folder / f"step-{STEPS}" / "__1_0.distcp", rng)
    dist.barrier()
    cfg.load_step = -1
    said["resumed"] = manager.load()
    Path(out, f"{rank}.json").write_text(json.dumps(said))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The checkpoint folder the WORLD ranks saved (its newest step set aside as corrupt at the
    end), and what each rank's loads said."""
    dump = tmp_path_factory.mktemp("four_ranks")
    multiprocessing.set_forkserver_preload(["parallel_harness"])
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(_free_port(), str(dump), out), nprocs=WORLD, start_method="forkserver"
        )
        said = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)]
    return dump / "checkpoint", said


def test_every_changed_byte_is_found_by_the_loader_on_every_rank(four_ranks):
    folder, said = four_ranks
    files = said[0]["files"]
    assert len(files) >= 20 and all(s["files"] == files for s in said)
    assert {Path(f).name for f in files} == {".metadata"} | {f"__{r}_0.distcp" for r in range(4)}
    assert said[0]["clean"] == STEPS
    for i, file in enumerate(files):
        for rank in range(WORLD):  # every rank raises the same one-line error naming the file
            error = said[rank]["errors"][i]
            assert error is not None, f"rank {rank} loaded {file} with a changed byte"
            assert "\n" not in error and error == said[0]["errors"][i]
            step = Path(file).parent.name.removeprefix("step-")
            assert re.search(rf"step {step}: {re.escape(file)} does not match its checksum", error)
            assert error.endswith("set checkpoint.load_step to a whole one")
    # load_step = -1 with a changed file in the newest: the one before, the newest set aside
    assert [s["resumed"] for s in said] == [STEPS - 1] * WORLD
    assert complete_steps(folder) == list(range(1, STEPS))
    assert (folder / f"step-{STEPS}.corrupt" / MANIFEST).is_file()


def test_every_changed_byte_is_found_offline(four_ranks):
    folder, said = four_ranks
    corrupt, newest = folder / f"step-{STEPS}.corrupt", folder / f"step-{STEPS}"
    problems, _ = check_folder(corrupt)  # the file the loader found changed
    assert len(problems) == 1
    assert problems[0].startswith(f"{corrupt / '__1_0.distcp'} does not match its checksum")
    restore_byte(corrupt / "__1_0.distcp", *said[0]["changed"])
    corrupt.rename(newest)
    files = checkpoint_files(folder)
    assert len(files) == 20
    rng = random.Random(1)
    for file in files:
        changed = flip_a_byte(file, rng)
        problems, _ = check_folder(file.parent)
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{file} does not match its checksum"), problems
        restore_byte(file, *changed)
    for step in range(1, STEPS + 1):  # the clean checkpoints verify
        problems, summary = check_folder(folder / f"step-{step}")
        assert problems == [] and summary.startswith(f"{WORLD + 1} files"), summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-process run's dump folder with step-3 and step-6, both with checksums."""
    dump = tmp_path_factory.mktemp("trained")
    make_trainer(dump, "--checkpoint.enable").train()
    return dump


@pytest.fixture
def dump(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_changed_newest_is_set_aside_and_a_named_step_fails(dump, caplog):
    folder = dump / "checkpoint"
    assert read_manifest(folder / "step-6").keys() == {".metadata", "__0_0.distcp"}
    bad = folder / "step-6" / "__0_0.distcp"
    flip_a_byte(bad, random.Random(2))
    named = ("--checkpoint.enable", "--checkpoint.load_step", "6")
    with pytest.raises(CheckpointError, match=rf"step 6: {re.escape(str(bad))} does not match"):
        make_trainer(dump, *named)
    assert complete_steps(folder) == [3, 6]  # a named step is never set aside
    with caplog.at_level(logging.INFO, logger="titan"):
        assert make_trainer(dump, "--checkpoint.enable").step == 3
    assert f"checkpoint step 6 cannot be loaded: {bad} does not match its checksum" in caplog.text
    assert "Renamed it to step-6.corrupt; resuming from step 3 instead" in caplog.text
    assert re.search(r"step-3: 0.\d\d GiB verified in", caplog.text)
    assert complete_steps(folder) == [3] and (folder / "step-6.corrupt" / bad.name).is_file()


def test_without_checksums_loads_as_before(dump, caplog):
    folder = dump / "checkpoint"
    (folder / "step-6" / MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="titan"):
        assert make_trainer(dump, "--checkpoint.enable").step == 6
    assert f"{folder / 'step-6'} has no checksums.json" in caplog.text
    # a save with checksums = false writes none; its load is not verified
    make_trainer(dump, "--checkpoint.enable", "--checkpoint.checksums", "false").checkpointer._save(
        {"w": torch.ones(3)}, 7, asynchronous=False
    )
    assert complete_steps(folder) == [3, 6, 7] and read_manifest(folder / "step-7") is None


def test_offline_command_exit_codes_and_output(dump, capsys):
    folder = dump / "checkpoint"
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [f"OK {folder}/step-{s}" for s in (3, 6)]
    bad = folder / "step-3" / ".metadata"
    flip_a_byte(bad, random.Random(3))
    assert main([str(folder / "step-6"), str(folder)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"OK {folder}/step-6: 2 files")
    assert out[1].startswith(f"BAD {bad} does not match its checksum (xxh3_128 ")
    assert out[2].startswith(f"FAILED {folder}/step-3: 2 files") and len(out) == 4
    (folder / "step-6" / MANIFEST).unlink()
    assert main([str(folder / "step-6")]) == 0
    assert "no checksums.json: files present and long enough" in capsys.readouterr().out
    assert main([str(dump)]) == 2
    assert capsys.readouterr().out.startswith(f"error: {dump} holds no checkpoint")
