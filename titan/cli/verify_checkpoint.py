"""Verify checkpoints offline against the checksums their saves recorded.

    titan-verify-checkpoint FOLDER [FOLDER ...]

FOLDER is one checkpoint (a step-N folder, or any DCP folder holding checksums.json) or a
checkpoint folder holding step-N folders, each of which is verified. Every file is re-hashed;
each bad one (changed, missing, truncated, or not covered by checksums.json) is printed on a
line of its own. A folder without checksums.json (an older titan, or checkpoint.checksums =
false) is checked for missing and truncated files only, and says so. Exit code 0 when all
verify, 1 when any file is bad, 2 when a FOLDER holds no checkpoint.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from titan.checkpoint.checkpointer import complete_steps
from titan.checkpoint.checksums import MANIFEST, read_manifest, uncovered, verify
from titan.checkpoint.dcp_io import read_dcp_metadata
from titan.errors import CheckpointError


def check_folder(folder: Path) -> tuple[list[str], str]:
    """(every problem found, a one-line summary) for one checkpoint folder."""
    try:
        files = read_manifest(folder)
        if files is None:
            read_dcp_metadata(folder)
            return [], f"no {MANIFEST}: files present and long enough, contents not verified"
    except CheckpointError as e:
        return [str(e)], ""
    found = verify(folder, files, sorted(files))
    if not any(".metadata" in p for p in found.problems):  # a changed .metadata is not read
        try:
            found.problems += [f"{folder / n} has no checksum in {MANIFEST}" for n in
                               uncovered(read_dcp_metadata(folder), files)]  # fmt: skip
        except CheckpointError as e:
            found.problems.append(str(e))
    rate = found.size / 2**30 / max(found.seconds, 1e-9)
    return found.problems, (
        f"{found.files} files, {found.size / 2**30:.3f} GiB verified in {found.seconds:.2f}s "
        f"({rate:.2f} GiB/s)"
    )


def checkpoints_in(folder: Path) -> list[Path]:
    """`folder` itself when it is a checkpoint, else its step-N folders, oldest first."""
    if (folder / ".metadata").is_file() or (folder / MANIFEST).is_file():
        return [folder]
    return [folder / f"step-{step}" for step in complete_steps(folder)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="titan-verify-checkpoint",
        description="Verify checkpoint files against the checksums their saves recorded.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="a step-N folder or their parent")
    args = parser.parse_args(argv)
    bad = 0
    for folder in args.folders:
        checkpoints = checkpoints_in(folder)
        if not checkpoints:
            print(f"error: {folder} holds no checkpoint (no .metadata, no step-N folders)")
            return 2
        for checkpoint in checkpoints:
            problems, summary = check_folder(checkpoint)
            for problem in problems:
                print(f"BAD {problem}")
            print(f"{'FAILED' if problems else 'OK'} {checkpoint}: {summary or 'not loadable'}")
            bad += len(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
