#!/usr/bin/env bash
# Train titan from a TOML config, with --section.key value overrides passed through:
#   CONFIG_FILE=titan/train_configs/debug_model.toml ./run_train.sh --training.steps 20
# NGPU processes (default 1) are started with torchrun; LOG_RANK picks whose output is shown.
# Several machines: start it once on each, with the same NNODES, MASTER_ADDR (node 0's address:
# node 0 hosts the rendezvous) and MASTER_PORT (default 29500), and NODE_RANK 0..NNODES-1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 ./run_train.sh ...   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NGPU=8 ./run_train.sh ...   # on node1
# In a Slurm job (SLURM_JOB_ID set) what is unset comes from the allocation: see
# scripts/slurm/train.sbatch. RDZV_ID (default: the Slurm job id) names the rendezvous.
# MAX_RESTARTS=N: when a process dies, torchrun restarts all of them, up to N times; with
# --checkpoint.enable the restarted run resumes from its newest checkpoint.
# COMM_MODE=fake_backend NGPU=N: a dry run; one process acts as rank 0 of NNODES x NGPU (and,
# pipelined, a forked one as the last stage's first rank, or the ranks dry_run.ranks names) with
# collectives that move no data, builds the sharded model for the config, traces one step and
# reports its peak memory by part.
# Preemption: titan's ranks catch resilience.preemption_signals (SIGTERM, SIGUSR1), finish the
# step, save it (with --checkpoint.enable) and exit 143. torchrun (this script execs it: signal
# its pid) forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and, told so below, SIGUSR1 (Slurm's
# --signal=USR1@N) to every rank, then waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch >= 2.12;
# 30 s fixed in 2.11) before it SIGKILLs them: the step and its save must fit in that time. It
# then exits 1 without restarting anything, whatever MAX_RESTARTS says.
# Errors: each failed rank's one-line titan message (or traceback) is in torchrun's failure
# summary, whatever LOG_RANK shows.
# The first run creates ./.venv with the dependencies if the current Python lacks them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
CONFIG_FILE=${CONFIG_FILE:-"$ROOT/titan/train_configs/debug_model.toml"}
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # One task per node. What the user set wins; the rest describes this job's allocation.
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}
  SLURM_GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
  NGPU=${NGPU:-${SLURM_GPUS##*:}}  # --gpus-per-node=h100:8 gives SLURM_GPUS_PER_NODE=h100:8
  RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NGPU=${NGPU:-1}
LOG_RANK=${LOG_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
check_count() {  # name, value, smallest allowed
  if ! [[ $2 =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ]; then
    echo "run_train.sh: $1=$2 must be a whole number >= $3" >&2
    exit 2
  fi
}
check_count NNODES "$NNODES" 1
check_count NODE_RANK "$NODE_RANK" 0
check_count NGPU "$NGPU" 1
check_count MAX_RESTARTS "$MAX_RESTARTS" 0
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "run_train.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
  exit 2
fi
PYTHON=$("$ROOT/scripts/setup_env.sh")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# torch's flight recorder keeps the last collectives of each process group (NCCL and gloo): the
# hang watchdog (resilience.watchdog_timeout_s) reports the ones a stuck rank waits in.
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}

if [ "${COMM_MODE:-}" = fake_backend ]; then
  OMP_NUM_THREADS=$(nproc)  # one process does the work
  WORLD_SIZE=$((NNODES * NGPU)) RANK=0 LOCAL_RANK=0 exec "$PYTHON" -m titan.train \
    --job.config_file "$CONFIG_FILE" "$@"
fi
if [ "$NGPU" = 1 ] && [ "$NNODES" = 1 ] && [ "$MAX_RESTARTS" = 0 ]; then
  # One process needs no rendezvous: skip torchrun's start-up cost.
  exec "$PYTHON" -m titan.train --job.config_file "$CONFIG_FILE" "$@"
fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ "$NNODES" -gt 1 ]; then
  if [ -z "${MASTER_ADDR:-}" ]; then
    # Slurm numbers the nodes in the order of its node list: node 0 is the first host.
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${HOSTS%%$'\n'*}
  fi
  # A port per job, so that jobs whose node 0 is the same host do not collide.
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
fi
MASTER_ADDR=${MASTER_ADDR:-localhost}
if [ "$NNODES" -gt 1 ]; then
  MASTER_PORT=${MASTER_PORT:-29500}  # every node must name the same port: none can be picked
else
  MASTER_PORT=${MASTER_PORT:-0}  # one node: torchrun picks a free port
fi
RDZV_ID=${RDZV_ID:-titan}
if [ "$MAX_RESTARTS" != 0 ]; then
  # torchrun shares its rendezvous store with the processes, and a restarted group then reads the
  # dead group's addresses from it and fails to connect (pytorch/pytorch#135712): with restarts,
  # every group starts a store of its own.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
# torchrun's c10d rendezvous numbers the nodes itself (by host name). NODE_RANK 0 hosts its store
# at MASTER_ADDR:MASTER_PORT and the others connect to it: named rather than guessed from host
# names, so that a port already taken fails at once instead of joining another job's store.
IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)
echo "run_train.sh: node $NODE_RANK of $NNODES (NGPU=$NGPU each), rendezvous" \
  "$MASTER_ADDR:$MASTER_PORT id $RDZV_ID, MAX_RESTARTS=$MAX_RESTARTS" >&2
# --signals_to_handle (torch >= 2.9): torchrun's default list lacks SIGUSR1, which would kill it
# and orphan the ranks.
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPU" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 --max-restarts "$MAX_RESTARTS" \
  --rdzv_backend c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  --rdzv_conf "is_host=$IS_HOST" -m titan.train --job.config_file "$CONFIG_FILE" "$@"
