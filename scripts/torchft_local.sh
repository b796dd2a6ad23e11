#!/usr/bin/env bash
# Fault-tolerant training with torchft on one machine: a lighthouse and REPLICA_GROUPS replica
# groups, each its own ./run_train.sh job of NGPU processes (FSDP/TP/CP/PP inside a group), passed
# the [fault_tolerance] flags; arguments go to every group:
#   REPLICA_GROUPS=2 NGPU=2 CONFIG_FILE=titan/train_configs/debug_model.toml \
#       scripts/torchft_local.sh --training.steps 50 --job.dump_folder ./outputs/ft
# Group g writes under <job.dump_folder>/replica_<g> (log, metrics.jsonl, checkpoints); its
# stdout/stderr go to <LOG_DIR>/group_<g>.log (LOG_DIR default ./outputs/torchft_logs).
# RESTART=1: a group that exits with a failure (a killed rank) is started again; it joins the
# next quorum and heals from a live peer (weights, optimizer, LR schedule, step, data position).
# RESTART_DELAY (seconds, default 1) before such a restart.
# MIN_REPLICAS (default REPLICA_GROUPS): the groups the lighthouse waits for before the first
# quorum, and the groups a step needs to commit (fault_tolerance.min_replicas). With 1, a group
# that starts late heals and misses the first steps' slices; the others go on alone when one dies.
# LIGHTHOUSE_PORT (29510), GROUP_PORT (29600: group g's rendezvous port is GROUP_PORT + g). With
# GPUs, group g sees GPUs g*NGPU .. g*NGPU+NGPU-1 (CUDA_VISIBLE_DEVICES).
# Slurm: run the lighthouse once (torchft_lighthouse --min_replicas N --bind [::]:29510) and one
# scripts/slurm/train.sbatch job per group with --fault_tolerance.enable
# --fault_tolerance.replica_group g --fault_tolerance.replica_groups N
# --fault_tolerance.lighthouse http://LIGHTHOUSE_HOST:29510 (docs/resilience.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPLICA_GROUPS=${REPLICA_GROUPS:-2}
NGPU=${NGPU:-1}
MIN_REPLICAS=${MIN_REPLICAS:-$REPLICA_GROUPS}
RESTART=${RESTART:-0}
LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
GROUP_PORT=${GROUP_PORT:-29600}
LOG_DIR=${LOG_DIR:-./outputs/torchft_logs}
PYTHON=$("$ROOT/scripts/setup_env.sh")
LIGHTHOUSE_BIN=$(dirname "$PYTHON")/torchft_lighthouse
if [ ! -x "$LIGHTHOUSE_BIN" ]; then
  echo "torchft_local.sh: no torchft_lighthouse beside $PYTHON: pip install torchft" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"
# A quorum is issued once MIN_REPLICAS groups asked; groups that heartbeat but have not asked
# yet are waited for up to join_timeout_ms (a dead group stops heartbeating after 5 s).
"$LIGHTHOUSE_BIN" --min_replicas "$MIN_REPLICAS" --quorum_tick_ms 100 \
  --join_timeout_ms "${JOIN_TIMEOUT_MS:-10000}" --bind "[::]:$LIGHTHOUSE_PORT" \
  >"$LOG_DIR/lighthouse.log" 2>&1 &
lighthouse_pid=$!
pids=()
cleanup() {
  for pid in "${pids[@]}" "$lighthouse_pid"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

run_group() {  # group id: run it (again, with RESTART=1, after a failure)
  local g=$1 status=0 devices=""
  shift
  if command -v nvidia-smi >/dev/null 2>&1; then
    devices=$(seq -s, $((g * NGPU)) $((g * NGPU + NGPU - 1)))
  fi
  while :; do
    status=0
    CUDA_VISIBLE_DEVICES=${devices:-${CUDA_VISIBLE_DEVICES:-}} NGPU=$NGPU \
      MASTER_PORT=$((GROUP_PORT + g)) RDZV_ID="titan_ft_$g" "$ROOT/run_train.sh" "$@" \
      --fault_tolerance.enable --fault_tolerance.replica_group "$g" \
      --fault_tolerance.replica_groups "$REPLICA_GROUPS" \
      --fault_tolerance.min_replicas "$MIN_REPLICAS" \
      --fault_tolerance.lighthouse "http://localhost:$LIGHTHOUSE_PORT" \
      >>"$LOG_DIR/group_$g.log" 2>&1 || status=$?
    if [ "$status" = 0 ] || [ "$RESTART" != 1 ]; then
      return "$status"
    fi
    echo "torchft_local.sh: group $g exited with status $status: restarting it" \
      | tee -a "$LOG_DIR/group_$g.log" >&2
    sleep "${RESTART_DELAY:-1}"
  done
}

for ((g = 0; g < REPLICA_GROUPS; g++)); do
  run_group "$g" "$@" &
  pids+=($!)
done
failed=0
for ((g = 0; g < REPLICA_GROUPS; g++)); do
  wait "${pids[$g]}" || { echo "torchft_local.sh: group $g failed (see $LOG_DIR/group_$g.log)" >&2; failed=1; }
done
exit "$failed"
