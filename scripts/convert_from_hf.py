"""`titan-convert-from-hf` run from a checkout: python scripts/convert_from_hf.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # titan need not be installed
from titan.cli.convert_from_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
