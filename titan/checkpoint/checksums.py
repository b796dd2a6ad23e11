"""Checksums of a checkpoint's files: written with each save, verified before each load.

DCP keeps no checksums, so a file changed in place (a flipped bit, same length) would load
silently. A save records every file's size and digest in `checksums.json` beside `.metadata`;
a load, or `titan-verify-checkpoint`, re-hashes the files and names any that differ.

The hash is xxHash's XXH3-128 (python-xxhash, already installed as a dependency of `datasets`):
11.2 GB/s on one core of the 2-core CI machine against 1.9 GB/s for the stdlib's zlib.crc32,
0.8-1.0 GB/s for blake2b/sha256 and 9.7 GB/s for crc32c (benchmarks/README.md), so hashing
stays well below the cost of reading the files from disk.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from titan.checkpoint.dcp_io import read_dcp_metadata
from titan.errors import CheckpointError

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20  # read size: large enough that the per-call overhead vanishes
_RANK_PART = ".checksums.{}.json"  # one rank's digests, merged into MANIFEST by rank 0


def hash_file(path: Path) -> str:
    """The hex digest of a file's bytes, read in chunks into one reused buffer."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def hash_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"size": bytes, "digest": hex}} for the files `names` in `folder`."""
    return {
        n: {"size": (folder / n).stat().st_size, "digest": hash_file(folder / n)} for n in names
    }


class ChecksummedWriter(FileSystemWriter):
    """DCP's file writer that also records checksums: each rank hashes the files it wrote, in
    the thread that wrote them (the background thread of an asynchronous save, so training
    is not blocked), into a per-rank file; rank 0, finishing the save once every rank's write
    returned, hashes `.metadata` and merges them all into MANIFEST. No collective is added, so
    sync and async saves complete exactly as without checksums."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future = super().write_data(plan, planner)  # the files are written when this returns
        results = future.wait()
        names = sorted({r.storage_data.relative_path for r in results})
        part = Path(self.path) / _RANK_PART.format(plan.storage_data.prefix.strip("_"))
        part.write_text(json.dumps(hash_files(Path(self.path), names)))
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        super().finish(metadata, results)  # writes .metadata
        folder = Path(self.path)
        files = hash_files(folder, [".metadata"])
        for part in sorted(folder.glob(_RANK_PART.format("*"))):
            files.update(json.loads(part.read_text()))
            part.unlink()
        written = {r.storage_data.relative_path for rank in results for r in rank}
        if missing := sorted(written - files.keys()):
            raise RuntimeError(f"no checksums were recorded for {missing} in {folder}")
        write_manifest(folder, files)


def write_manifest(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """MANIFEST in `folder`, written under another name and renamed, so it is whole or absent."""
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True))
    tmp.rename(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """{file name: {"size", "digest"}} from a folder's MANIFEST; None when it has none (saved
    by an older titan, or with checkpoint.checksums = false)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        algorithm, files = manifest["algorithm"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); restore it or delete it") from None
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{path} uses {algorithm}; this titan verifies {ALGORITHM} only")
    return files


def check_file(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    """Why `folder/name` differs from its manifest entry, or None when it matches."""
    path = folder / name
    if not path.is_file():
        return f"{path} is missing (named in {MANIFEST})"
    if (size := path.stat().st_size) != entry["size"]:
        return f"{path} changed size: {size} bytes, {MANIFEST} recorded {entry['size']}"
    if (digest := hash_file(path)) != entry["digest"]:
        return (
            f"{path} does not match its checksum ({ALGORITHM} {digest}, {MANIFEST} recorded "
            f"{entry['digest']}): the file changed after it was saved"
        )
    return None


def uncovered(metadata: Metadata, files: dict[str, Any]) -> list[str]:
    """Data files the DCP metadata names that the manifest does not cover."""
    named = {info.relative_path for info in (metadata.storage_data or {}).values()}
    return sorted(named - files.keys())


def share(files: dict[str, dict[str, Any]], rank: int, world_size: int) -> list[str]:
    """The data files rank `rank` verifies: its own files (`__<rank>_*`, the ones it wrote when
    the layout is the one that saved), and of the rest (`.metadata`, files of ranks beyond
    world_size) every world_size-th; every file goes to exactly one rank."""
    own, rest = [], []
    for name in sorted(files):
        writer = name.split("_")[2] if name.startswith("__") else ""
        if writer.isdigit() and int(writer) < world_size:
            if int(writer) == rank:  # another rank's own files are that rank's to verify
                own.append(name)
        else:
            rest.append(name)
    return own + rest[rank::world_size]


@dataclass
class Verified:
    """What verifying some files found: the problems (one line each), files and bytes read."""

    problems: list[str] = field(default_factory=list)
    files: int = 0
    size: int = 0
    seconds: float = 0.0


def verify(folder: Path, files: dict[str, dict[str, Any]], names: list[str]) -> Verified:
    """Re-hash the files `names` of `folder` against the manifest entries `files`."""
    found, start = Verified(), time.perf_counter()
    for name in names:
        if problem := check_file(folder, name, files[name]):
            found.problems.append(problem)
        found.files += 1
        found.size += files[name]["size"]
    found.seconds = time.perf_counter() - start
    return found


def check_share(
    folder: Path, rank: int = 0, world_size: int = 1
) -> tuple[Metadata, Verified | None]:
    """A step folder's metadata once its files check: `.metadata` against its checksum (every
    rank reads it), every data file present and long enough, and this rank's share of the data
    files against their checksums. Raises CheckpointError naming the first bad file. Verified
    is None when the folder has no manifest (only presence and sizes were checked)."""
    files = read_manifest(folder)
    # .metadata first: a changed one could unpickle into anything (a missing one is named below)
    if files is not None and (folder / ".metadata").is_file():
        entry = files.get(".metadata", {"size": -1, "digest": ""})
        if problem := check_file(folder, ".metadata", entry):
            raise CheckpointError(problem)
    metadata = read_dcp_metadata(folder)
    if files is None:
        return metadata, None
    if missing := uncovered(metadata, files):
        raise CheckpointError(
            f"{folder / MANIFEST} has no checksum for {missing[:3]}: the folder was changed "
            "after its save; restore it, or delete the manifest to load it unverified"
        )
    names = [n for n in share(files, rank, world_size) if n != ".metadata"]
    found = verify(folder, files, names)
    if found.problems:
        raise CheckpointError(found.problems[0])
    return metadata, found
