#!/usr/bin/env bash
# Submit a torchft run on Slurm: one job for the lighthouse (one CPU task), then REPLICA_GROUPS
# jobs of scripts/slurm/train.sbatch, one per replica group, each with its own nodes, restarts
# and requeue. Run from the repository root; sbatch options for the group jobs go in
# SBATCH_ARGS, titan's arguments after the script:
#   REPLICA_GROUPS=4 SBATCH_ARGS="--nodes 2" CONFIG_FILE=titan/train_configs/llama3_8b.toml \
#       MAX_RESTARTS=100 scripts/slurm/torchft_submit.sh --checkpoint.enable
# MAX_RESTARTS (passed to each group's torchrun): a failed rank restarts its own group only; the
# restarted group joins the next quorum and heals from a live one. MIN_REPLICAS (default 1): the
# groups a step needs. LIGHTHOUSE_PORT (29510). The lighthouse job runs until it is cancelled:
# scancel it after the groups end (its id is printed).
set -euo pipefail
REPLICA_GROUPS=${REPLICA_GROUPS:-2}
MIN_REPLICAS=${MIN_REPLICAS:-1}
LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
if [ ! -f scripts/slurm/train.sbatch ]; then
  echo "torchft_submit.sh: run it from titan's root" >&2
  exit 2
fi
PYTHON=$(scripts/setup_env.sh)
LIGHTHOUSE_BIN=$(dirname "$PYTHON")/torchft_lighthouse
# the lighthouse: one quorum per step for every group, a few MB of memory, no GPU
lighthouse_job=$(sbatch --parsable --job-name=titan-lighthouse --nodes=1 --ntasks=1 \
  --cpus-per-task=2 --time="${LIGHTHOUSE_TIME:-7-00:00:00}" --output=%x-%j.out \
  --wrap "$LIGHTHOUSE_BIN --min_replicas $MIN_REPLICAS --quorum_tick_ms 100 \
    --join_timeout_ms 60000 --bind [::]:$LIGHTHOUSE_PORT")
echo "lighthouse: job $lighthouse_job"
host=""
while [ -z "$host" ] || [ "$host" = "(null)" ]; do  # its node is known once it runs
  sleep 5
  host=$(squeue -h -j "$lighthouse_job" -t RUNNING -o %N || true)
done
echo "lighthouse: http://$host:$LIGHTHOUSE_PORT"
for ((g = 0; g < REPLICA_GROUPS; g++)); do
  # shellcheck disable=SC2086 # SBATCH_ARGS: several options
  sbatch --job-name="titan-ft-$g" ${SBATCH_ARGS:-} scripts/slurm/train.sbatch "$@" \
    --fault_tolerance.enable --fault_tolerance.replica_group "$g" \
    --fault_tolerance.replica_groups "$REPLICA_GROUPS" \
    --fault_tolerance.min_replicas "$MIN_REPLICAS" \
    --fault_tolerance.lighthouse "http://$host:$LIGHTHOUSE_PORT"
done
echo "after the groups end: scancel $lighthouse_job"
