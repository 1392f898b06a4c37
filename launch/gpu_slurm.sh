#!/usr/bin/env bash
#SBATCH --job-name=lbq
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=lbq-%j.out
#
# Multi-node GPU training under SLURM. Submit from the repository root, with the Python
# environment that has lbq active (sbatch exports it to the job):
#
#   sbatch launch/gpu_slurm.sh --config=configs/imagenet_w2a2.py --workdir=/shared/runs/w2a2
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=... --workdir=... --config.batch_size=1024
#
# Layout: ONE task (process) per node, which sees all the node's GPUs. lbq's step is one
# jax.jit over every device of every process, so a process per node is enough; it runs one
# input pipeline per node and reads its own 1/num_nodes of each global batch.
# The coordinator is the first node of the job (scontrol show hostnames). lbq passes
# LBQ_COORDINATOR_ADDRESS / LBQ_NUM_PROCESSES / LBQ_PROCESS_ID to jax.distributed.initialize
# and turns JAX's own SLURM detection off, because that detection assumes one process per
# GPU and would hide all but one GPU from each process.
#
# The workdir must be on a filesystem that every node sees (checkpoints are written by all
# processes, metrics by process 0). Preemption and the time limit: SLURM sends SIGTERM 300 s
# before the end, lbq saves a checkpoint and exits with 75, and this script requeues the job,
# which resumes from the workdir (set LBQ_REQUEUE=0 to stop instead).
#
# Environment: PYTHON (default python3), LBQ_PORT (coordinator port; default derived from the
# job id), LBQ_REQUEUE. --dry-run (or DRY_RUN=1) prints the environment and the srun line
# instead of running them. Outside SLURM it stands HEAD_NODE and JOB_ID in for the job's first
# node and id, takes the node count from the #SBATCH --nodes line, and says so; set
# SLURM_JOB_NODELIST, SLURM_NNODES and SLURM_JOB_ID to see a particular job's values:
#
#   bash launch/gpu_slurm.sh --dry-run --config=configs/default.py --workdir=/shared/runs/x
#   DRY_RUN=1 SLURM_JOB_NODELIST='gpu[01-02]' SLURM_NNODES=2 SLURM_JOB_ID=1 \
#     bash launch/gpu_slurm.sh --config=configs/default.py --workdir=/shared/runs/x
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: the helpers are found through the
# submission folder, the repository root.
repo=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
LAUNCHER=gpu_slurm.sh
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"

PYTHON=${PYTHON:-python3}
dry_run=${DRY_RUN:-0}
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    *) args+=("$arg") ;;
  esac
done

has_flag --config || die "--config=CONFIG is required"
has_flag --workdir || die "--workdir=DIR is required"
# Outside a job, a dry run stands placeholders in for what SLURM would set, and says so.
unset_vars=()
for var in SLURM_JOB_NODELIST SLURM_NNODES SLURM_JOB_ID; do
  [[ -n ${!var:-} ]] && continue
  [[ $dry_run == 1 ]] ||
    die "$var is not set: submit with sbatch (or add --dry-run to print the commands)"
  unset_vars+=("$var")
done
[[ ${SLURM_NNODES:-1} =~ ^[1-9][0-9]*$ ]] ||
  die "SLURM_NNODES must be a node count, got '$SLURM_NNODES'"
[[ ${SLURM_JOB_ID:-0} =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID must be a job number, got '$SLURM_JOB_ID'"
if [[ -n ${LBQ_PORT:-} ]] && ! { [[ $LBQ_PORT =~ ^[0-9]{1,5}$ ]] && ((10#$LBQ_PORT >= 1 &&
  10#$LBQ_PORT <= 65535)); }; then
  die "LBQ_PORT must be a port number (1-65535), got '$LBQ_PORT'"
fi
placeholder_node="" placeholder_job=""
if ((${#unset_vars[@]})); then
  stand_ins=()
  if [[ -z ${SLURM_NNODES:-} ]]; then
    # What sbatch uses without --nodes: this script's #SBATCH line.
    SLURM_NNODES=$(sed -n 's/^#SBATCH --nodes=\([1-9][0-9]*\)$/\1/p' "$0")
    SLURM_NNODES=${SLURM_NNODES:-1}
    stand_ins+=("$SLURM_NNODES nodes, from #SBATCH --nodes")
  fi
  if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    placeholder_node=HEAD_NODE
    stand_ins+=("HEAD_NODE for the job's first node")
  fi
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    placeholder_job=JOB_ID
    stand_ins+=("JOB_ID for its id")
    [[ -n ${LBQ_PORT:-} ]] || stand_ins+=("PORT for 61440 + JOB_ID mod 4096")
  fi
  printf -v joined '%s; ' "${stand_ins[@]}"
  echo "# Dry run outside SLURM (${unset_vars[*]} not set); stand-ins: ${joined%; }."
fi

# The first host of a SLURM node list such as 'gpu[07-08],cpu1', without scontrol (dry runs).
first_host() {
  local list=$1 head inner
  head=${list%%[,[]*}
  if [[ ${list:${#head}:1} == "[" ]]; then
    inner=${list:${#head}+1}
    head+=${inner%%[],-]*}
  fi
  echo "$head"
}

if [[ -n $placeholder_node ]]; then
  head_node=$placeholder_node
elif command -v scontrol >/dev/null 2>&1; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head_node=${hosts[0]:-}
  [[ -n $head_node ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
elif [[ $dry_run == 1 ]]; then
  show scontrol show hostnames "$SLURM_JOB_NODELIST"
  head_node=$(first_host "$SLURM_JOB_NODELIST")
else
  die "scontrol not found: run this script with sbatch on a SLURM cluster"
fi

# The same port range as JAX's SLURM detection, so that concurrent jobs rarely collide.
if [[ -n ${LBQ_PORT:-} ]]; then
  port=$LBQ_PORT
elif [[ -n $placeholder_job ]]; then
  port=PORT
else
  port=$((61440 + SLURM_JOB_ID % 4096))
fi

export LBQ_DISTRIBUTED=1
export LBQ_COORDINATOR_ADDRESS="$head_node:$port"
export LBQ_NUM_PROCESSES="$SLURM_NNODES"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# LBQ_PROCESS_ID differs per task, so each task sets it from its own SLURM_PROCID. No
# --kill-on-bad-exit: after SIGTERM every task exits with 75 once the checkpoint is committed,
# and a task that ended first must not cut the others' commit short. If a task crashes, the
# others stop on JAX's heartbeat timeout.
# shellcheck disable=SC2016  # expanded by each task's bash, not here
launch=(srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1
  bash -c 'export LBQ_PROCESS_ID=$SLURM_PROCID; exec "$@"' lbq-task
  "$PYTHON" -m lbq.main "${args[@]}" --config.distributed=True)

if [[ $dry_run == 1 ]]; then
  for var in LBQ_DISTRIBUTED LBQ_COORDINATOR_ADDRESS LBQ_NUM_PROCESSES PYTHONPATH; do
    show export "$var=${!var}"
  done
  echo "+ cd $(printf '%q' "$repo")"
  echo "# each task: LBQ_PROCESS_ID=\$SLURM_PROCID (0..$((SLURM_NNODES - 1)))"
  show "${launch[@]}"
  echo "# on exit code 75 (preempted): scontrol requeue ${SLURM_JOB_ID:-$placeholder_job}"
  echo "# Dry run: the commands above were only printed; nothing was started."
  exit 0
fi

cd "$repo"
echo "gpu_slurm.sh: $SLURM_NNODES processes, coordinator $LBQ_COORDINATOR_ADDRESS" >&2
# On preemption SLURM signals this shell too: keep it alive until the tasks have checkpointed.
trap 'echo "gpu_slurm.sh: SIGTERM; waiting for lbq to save a checkpoint" >&2' TERM
rc=0
"${launch[@]}" || rc=$?
if ((rc == 75)) && [[ ${LBQ_REQUEUE:-1} == 1 ]]; then
  echo "gpu_slurm.sh: preempted; requeueing job $SLURM_JOB_ID to resume from the checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
