"""`titan-verify-checkpoint` run from a checkout: python scripts/verify_checkpoint.py FOLDER."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # titan need not be installed
from titan.cli.verify_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
