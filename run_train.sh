#!/usr/bin/env bash
# Train titan from a TOML config, with --section.key value overrides passed through:
#   CONFIG_FILE=train_configs/debug_model.toml ./run_train.sh --training.steps 20
# NGPU processes (default 1) are started with torchrun; LOG_RANK picks whose output is shown.
# COMM_MODE=fake_backend NGPU=N: a dry run; one process acts as rank 0 of N with collectives
# that move no data, builds the sharded model for the config, takes one step, reports sizes.
# The first run creates ./.venv with the dependencies if the current Python lacks them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
CONFIG_FILE=${CONFIG_FILE:-"$ROOT/train_configs/debug_model.toml"}
NGPU=${NGPU:-1}
LOG_RANK=${LOG_RANK:-0}
PYTHON=$("$ROOT/scripts/setup_env.sh")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}

if [ "${COMM_MODE:-}" = fake_backend ]; then
  export OMP_NUM_THREADS=$(nproc)  # one process does the work
  WORLD_SIZE=$NGPU RANK=0 LOCAL_RANK=0 exec "$PYTHON" -m titan.train \
    --job.config_file "$CONFIG_FILE" "$@"
fi
if [ "$NGPU" = 1 ]; then
  # One process needs no rendezvous: skip torchrun's start-up cost.
  exec "$PYTHON" -m titan.train --job.config_file "$CONFIG_FILE" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" --local-ranks-filter "$LOG_RANK" \
  --role rank --tee 3 --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  -m titan.train --job.config_file "$CONFIG_FILE" "$@"
