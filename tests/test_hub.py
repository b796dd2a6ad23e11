"""Hugging Face hub ids as model paths (titan.hub), offline: the test stores titan's debug model,
exported to transformers format, and the shipped tokenizer as the hub caches a repo
(models--org--name/{blobs,refs,snapshots/<commit>}); HF_HUB_OFFLINE=1 makes the real download
path (snapshot_download) read it. The hub's answers that need a network (gated, missing) come
from a snapshot_download that raises what huggingface_hub raises for them."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from test_train import make_trainer

from titan.checkpoint.dcp_io import load_dcp_model
from titan.cli import convert_from_hf, convert_to_hf, download, evaluate, generate
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.hub import WANT, HubError, resolve_model_path
from titan.models.llama3.hf_io import empty_model, save_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO, TOK_ONLY = "titan-test/debug", "titan-test/tok-only"
COMMIT, TAG = "0123456789abcdef0123456789abcdef01234567", "v1"
SMALL = ("--training.seq_len", "64", "--training.local_batch_size", "2")


def store(src: Path, home: Path, repo: str, commit: str, refs: tuple[str, ...]) -> Path:
    """Put the files under `src` into the hub cache at HF_HOME=`home` as huggingface_hub does:
    content-addressed blobs, the commit's snapshot linking to them, refs naming the commit."""
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> SimpleNamespace:
    """The debug model (seed 3) as a transformers folder with Meta's layout of the tokenizer, and
    a hub cache holding it as REPO (refs main and v1) and its tokenizer alone as TOK_ONLY."""
    tmp = tmp_path_factory.mktemp("hub")
    source = make_trainer(tmp / "src", "--training.seed", "3", *SMALL)
    hf = tmp / "hf"
    save_hf_checkpoint(source.model.state_dict(), source.model_args, hf, dtype=torch.float32)
    (hf / "original").mkdir()
    shutil.copyfile(ROOT / SHIPPED_TOKENIZER, hf / "original" / "tokenizer.model")
    home = tmp / "home"
    snapshot = store(hf, home, REPO, COMMIT, ("main", TAG))
    store(hf / "original", home, TOK_ONLY, "f" * 40, ("main",))
    return SimpleNamespace(hf=hf, home=home, snapshot=snapshot, args=source.model_args)


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub.home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_ids_and_revisions_resolve_from_the_cache(offline, monkeypatch, tmp_path):
    calls = []
    real = huggingface_hub.snapshot_download

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    for name in (REPO, f"{REPO}@{COMMIT}", f"{REPO}@{TAG}"):
        assert resolve_model_path(name, "tokenizer", "t") == offline.snapshot
        assert resolve_model_path(name, "weights", "w") == offline.snapshot
    assert [c["allow_patterns"] for c in calls[:2]] == [WANT["tokenizer"], WANT["weights"]]
    assert {c["revision"] for c in calls} == {None, COMMIT, TAG}
    assert all(c["local_files_only"] for c in calls)
    assert resolve_model_path(str(offline.hf), "weights", "w") == offline.hf  # a folder as is
    assert len(calls) == 6
    tok = build_tokenizer(REPO)  # Meta's layout: original/tokenizer.model
    assert tok.path == offline.snapshot / "original" / "tokenizer.model"
    assert tok.encode("hub", bos=True, eos=False) == build_tokenizer(SHIPPED_TOKENIZER).encode(
        "hub", bos=True, eos=False
    )
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(offline.home / "hub"))
    assert resolve_model_path(REPO, "tokenizer", "t") == offline.snapshot


def test_online_downloads_hold_a_lock_per_repo(hub, monkeypatch):
    """With the hub reachable, one process per cache downloads a repo at a time."""
    monkeypatch.setenv("HF_HOME", str(hub.home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lock = hub.home / "hub" / ".locks" / "titan--titan-test--debug.lock"
    seen = []

    def fake(**kwargs):
        seen.append((kwargs["local_files_only"], lock.exists()))
        return str(hub.snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_path(REPO, "weights", "w") == hub.snapshot
    assert seen == [(False, True)]


def _first_loss(trainer) -> float:
    data = iter(trainer.dataloader)
    return trainer.train_step([next(data) for _ in range(trainer.grad_accum_steps)])[0]


def test_training_from_hub_ids_matches_the_local_folder(offline, tmp_path):
    def run(tokenizer: str, weights: str) -> float:
        trainer = make_trainer(
            tmp_path / tokenizer.replace("/", "_"), *SMALL, "--model.tokenizer_path", tokenizer,
            "--checkpoint.initial_load_path", weights, "--checkpoint.initial_load_in_hf",
        )  # fmt: skip
        return _first_loss(trainer)

    local = run(str(offline.hf), str(offline.hf))
    assert run(REPO, f"{REPO}@{TAG}") == local
    seed_0 = _first_loss(make_trainer(tmp_path / "seed0", *SMALL))  # the loaded weights count
    assert seed_0 != local


def test_convert_from_hf_and_generate_take_an_id(offline, tmp_path, capsys):
    assert convert_from_hf.main([REPO, str(tmp_path / "from_id")]) == 0
    assert convert_from_hf.main([str(offline.hf), str(tmp_path / "from_dir")]) == 0
    like = empty_model(offline.args).state_dict()
    from_id = load_dcp_model(tmp_path / "from_id", like)
    from_dir = load_dcp_model(tmp_path / "from_dir", empty_model(offline.args).state_dict())
    for k, v in from_dir.items():
        assert torch.equal(from_id[k], v), k
    # and back, the tokenizer files from the id
    back = tmp_path / "back"
    config_json = str(offline.snapshot / "config.json")
    argv = [str(tmp_path / "from_id"), str(back), "--config-json", config_json]
    assert convert_to_hf.main([*argv, "--tokenizer-dir", REPO]) == 0
    tok = (back / "original" / "tokenizer.model").read_bytes()
    assert tok == (ROOT / SHIPPED_TOKENIZER).read_bytes()
    capsys.readouterr()
    flags = ["--prompt", "The hub", "--max-new-tokens", "4", "--temperature", "0"]
    outs = []
    for name in (REPO, str(offline.hf)):
        assert generate.main([name, *flags]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("=== [0] The hub")


def test_download_prints_the_snapshot(offline, capsys):
    assert download.main([REPO]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(offline.snapshot)
    assert download.main([REPO, "--tokenizer-only", "--revision", TAG]) == 0
    assert capsys.readouterr().out.strip() == str(offline.snapshot)
    assert download.main([TOK_ONLY, "--tokenizer-only"]) == 0
    tok_only = offline.home / "hub" / "models--titan-test--tok-only" / "snapshots" / ("f" * 40)
    assert capsys.readouterr().out.strip() == str(tok_only)


def _raising(error: Exception):
    def fake(**kwargs):
        raise error

    return fake


def _http(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))
    return cls("from the hub", response=response)


def test_error_messages(offline, monkeypatch, capsys):
    def message(path: str, want: str = "weights") -> str:
        with pytest.raises(HubError) as e:
            resolve_model_path(path, want, "checkpoint.initial_load_path")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert message("nope.model") == (
        "checkpoint.initial_load_path = 'nope.model': no such file or folder, and not a Hugging "
        "Face hub id (org/name or org/name@revision)"
    )
    assert message("org/missing").endswith(
        "not in the hub cache " + str(offline.home / "hub")
        + " and HF_HUB_OFFLINE=1: run `titan-download org/missing --weights` first"
    )  # fmt: skip
    assert "has no config.json or *.safetensors" in message(TOK_ONLY)  # only the tokenizer
    capsys.readouterr()
    assert download.main(["org/missing", "--tokenizer-only"]) == 2
    assert capsys.readouterr().err == (
        "error: hub repo org/missing is not in the hub cache " + str(offline.home / "hub")
        + " and HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE\n"
    )  # fmt: skip
    # a dry run reads the cache only, and falls back to the shipped tokenizer
    assert build_tokenizer("org/missing", dry_run=True).path.name == "tokenizer.model"
    # the hub's answers, online
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    answers = {
        "is gated and this token has no access": _http(GatedRepoError, 401),
        "is not on the hub or not visible to this token": _http(RepositoryNotFoundError, 404),
        "org/secret has no revision 'main'": _http(RevisionNotFoundError, 404),
        "the hub cannot be reached": LocalEntryNotFoundError("offline"),
    }
    for expected, error in answers.items():
        monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(error))
        assert expected in message("org/secret@main"), expected
    # the commands print one line
    capsys.readouterr()
    assert download.main(["nope"]) == 2
    assert capsys.readouterr().err == (
        "error: 'nope' is not a Hugging Face hub id: give org/name[@revision]\n"
    )
    assert convert_from_hf.main(["org/secret", "out"]) == 2
    assert capsys.readouterr().err == (
        "error: hf_dir = 'org/secret': no such file or folder, and hub repo org/secret is not "
        "in the hub cache " + str(offline.home / "hub")
        + " and the hub cannot be reached: check the network, or run "
        "`titan-download org/secret --weights` where it can\n"
    )  # fmt: skip


def test_evaluate_takes_an_id(offline, capsys):
    flags = ["--steps", "1", "--training.seq_len", "64", "--training.local_batch_size", "2"]
    summaries = []
    for name in (f"{REPO}@{COMMIT}", str(offline.hf)):
        assert evaluate.main([name, *flags]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    assert summaries[0]["format"] == "hf" and summaries[0]["targets"] > 0
    assert summaries[0]["loss"] == summaries[1]["loss"]
