#!/usr/bin/env bash
# Print the Python interpreter that has titan's dependencies, creating ./.venv when none has them.
#   scripts/setup_env.sh          # training dependencies
#   scripts/setup_env.sh --dev    # plus the test tools (pytest, ruff, transformers, peft) and the
#                                 # extras plot (matplotlib) and trackers (tensorboard, wandb)
# TITAN_PYTHON=/path/to/python skips the search; TITAN_TORCH_SPEC (default torch==2.13.0) is the
# torch installed first into a new .venv: pinned, because an open range pulls a multi-GB CUDA build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODULES="torch, torchao, torchdata, tiktoken, safetensors, datasets, numpy, tqdm"
EXTRA=""
if [ "${1:-}" = "--dev" ]; then
  MODULES="$MODULES, pytest, transformers, peft, matplotlib, tensorboard, wandb"
  EXTRA="[dev]"
fi

if [ -n "${TITAN_PYTHON:-}" ]; then
  echo "$TITAN_PYTHON"
  exit 0
fi
for py in "$ROOT/.venv/bin/python" python3; do
  if command -v "$py" >/dev/null 2>&1 && "$py" -c "import $MODULES" >/dev/null 2>&1; then
    command -v "$py"
    exit 0
  fi
done

{
  echo "[setup_env] creating $ROOT/.venv with titan's dependencies (a few minutes, once)"
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  PIP=("$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "${TITAN_TORCH_SPEC:-torch==2.13.0}"
  "${PIP[@]}" -e "$ROOT$EXTRA"
} >&2
echo "$ROOT/.venv/bin/python"
