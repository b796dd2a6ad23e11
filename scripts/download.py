"""`titan-download` run from a checkout: python scripts/download.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # titan need not be installed
from titan.cli.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
