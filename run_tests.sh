#!/usr/bin/env bash
# Run titan's test suite (creates ./.venv with the dev dependencies on first use):
#   ./run_tests.sh            # everything
#   ./run_tests.sh -k config  # pytest arguments pass through
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
PYTHON=$("$ROOT/scripts/setup_env.sh" --dev)
cd "$ROOT"
exec "$PYTHON" -m pytest "$@"
