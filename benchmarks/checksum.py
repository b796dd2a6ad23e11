"""Checksum cost: a DCP save with and without checksums.json, and verifying the files, per GB.

Saves random fp32 tensors (`--gib` GiB in 64 MiB tensors) from one process through titan's
writer (checkpoint.checksums = true) and DCP's own (false), `--repeats` times each, alternating,
then re-hashes the files as a load does (titan.checkpoint.checksums.verify). The files are
read back from the page cache (just written); a cold read adds the disk's read time. The folder
is deleted at the end.

    python benchmarks/checksum.py [--gib 1] [--repeats 3] [--folder /tmp/titan_checksum_bench]
"""

import argparse
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from titan.checkpoint.checksums import ALGORITHM, ChecksummedWriter, read_manifest, verify


def timed_save(state: dict, folder: Path, checksums: bool) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    writer = ChecksummedWriter(folder) if checksums else dcp.FileSystemWriter(folder)
    start = time.perf_counter()
    dcp.save(state, checkpoint_id=folder, storage_writer=writer, no_dist=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/titan_checksum_bench"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    n = max(1, round(args.gib * 16))  # 64 MiB tensors
    state = {f"t{i}": torch.rand(16 << 20) for i in range(n)}
    gib = n / 16
    times: dict[str, list[float]] = {"off": [], "on": [], "verify": []}
    try:
        for _ in range(args.repeats):
            times["off"].append(timed_save(state, args.folder, checksums=False))
            times["on"].append(timed_save(state, args.folder, checksums=True))
            files = read_manifest(args.folder)
            found = verify(args.folder, files, sorted(files))
            assert not found.problems, found.problems
            times["verify"].append(found.seconds)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    off, on, check = (statistics.median(times[k]) for k in ("off", "on", "verify"))
    print(f"{gib:.2f} GiB, {ALGORITHM}, median of {args.repeats}")
    print("| what | time | per GiB |")
    print("|---|---|---|")
    print(f"| save, checksums off | {off:.2f} s | {off / gib:.2f} s |")
    print(f"| save, checksums on | {on:.2f} s | {on / gib:.2f} s |")
    print(f"| checksums' share of the save | {on - off:.2f} s | {(on - off) / gib:.2f} s |")
    print(f"| verify (page cache) | {check:.2f} s | {check / gib:.2f} s |")


if __name__ == "__main__":
    main()
