#!/usr/bin/env bash
# Train on one machine with all its GPUs (or CPU).
#
#   launch/local.sh --config=configs/cifar100_w2a2.py --workdir=runs/w2a2 [lbq.main flags...]
#   launch/local.sh --processes=2 --config=configs/default.py:tiny --workdir=/tmp/mp
#
# Default: ONE process that sees every local GPU. lbq's train step is one jax.jit over a
# ('data',) mesh of all visible devices, so a single process already uses all GPUs, with one
# input pipeline and no coordinator to set up. This is the mode to use on one machine.
#
# --processes=N starts N processes that talk through jax.distributed, as the hosts of a
# multi-host run do (coordinator 127.0.0.1). With GPUs, each process gets its own share of
# CUDA_VISIBLE_DEVICES (the GPU count must divide by N); on CPU each process has one CPU
# device. Use it to rehearse a multi-host run on one machine; it is what the multi-process
# test runs. Process 0 prints to the terminal; process i logs to WORKDIR/logs/process_i.log.
#
# Options (anywhere among the lbq.main flags):
#   --processes=N   number of processes (default 1)
#   --port=P        coordinator port for N > 1 (default: a free port)
#   --dry-run       print the commands and environment instead of running (or DRY_RUN=1)
# Environment: PYTHON (default python3), LBQ_STOP_GRACE (seconds the other processes get to
# exit after one fails before they are killed, default 30).
#
# Exit code: 0 when every process succeeded; otherwise the first failing process's code
# (75 means preempted: rerun the same command to resume from the last checkpoint).
set -euo pipefail
LAUNCHER=local.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON=${PYTHON:-python3}
processes=1
port=""
dry_run=${DRY_RUN:-0}
args=()

while (($#)); do
  case "$1" in
    --processes=*) processes=${1#*=} ;;
    --processes) processes=${2:?--processes needs a value}; shift ;;
    --port=*) port=${1#*=} ;;
    --port) port=${2:?--port needs a value}; shift ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done

[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$processes'"
if [[ -n $port ]] && ! { [[ $port =~ ^[0-9]{1,5}$ ]] && ((10#$port >= 1 && 10#$port <= 65535)); }
then
  die "--port must be a port number (1-65535), got '$port'"
fi
workdir=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir=${args[i]#*=} ;;
    --workdir) workdir=${args[i + 1]:-} ;;
  esac
done
has_flag --config || die "--config=CONFIG is required"
[[ -n $workdir ]] || die "--workdir=DIR is required"

# lbq and the configs package import from the repository wherever the command runs.
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[[ $dry_run == 1 ]] && show export "PYTHONPATH=$PYTHONPATH"

if [[ $dry_run != 1 ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  die "PYTHON=$PYTHON is not a command; activate the environment that has lbq, or set PYTHON"
fi

if ((processes == 1)); then
  cmd=("$PYTHON" -m lbq.main "${args[@]}")
  if [[ $dry_run == 1 ]]; then
    show "${cmd[@]}"
    echo "# Dry run: the command above was only printed; nothing was started."
    exit 0
  fi
  exec "${cmd[@]}"
fi

# GPUs to share out: the visible list if CUDA_VISIBLE_DEVICES is set, else nvidia-smi's.
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
per_process=0
if ((${#gpus[@]})); then
  ((${#gpus[@]} % processes == 0)) ||
    die "${#gpus[@]} GPUs (${gpus[*]}) do not divide over $processes processes"
  per_process=$((${#gpus[@]} / processes))
fi

if [[ -z $port && $dry_run == 1 ]]; then
  port=PORT # chosen when it runs; a dry run needs no Python
  echo "# PORT stands for a free port, chosen when it runs (or --port)."
elif [[ -z $port ]]; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logdir="$workdir/logs"

# Sets env_vars to the environment of process $1.
process_env() {
  env_vars=(LBQ_DISTRIBUTED=1 "LBQ_COORDINATOR_ADDRESS=127.0.0.1:$port"
    "LBQ_NUM_PROCESSES=$processes" "LBQ_PROCESS_ID=$1")
  if ((per_process)); then
    local share=("${gpus[@]:$1*per_process:per_process}")
    env_vars+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${share[*]}")")
  fi
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    process_env "$i"
    line=$(show env "${env_vars[@]}" "$PYTHON" -m lbq.main "${args[@]}")
    ((i)) && line+=" > $(printf '%q' "$logdir/process_$i.log") 2>&1"
    echo "$line &"
  done
  echo "+ wait"
  echo "# Dry run: the commands above were only printed; nothing was started."
  exit 0
fi

mkdir -p "$logdir"
pids=()
for ((i = 0; i < processes; i++)); do
  process_env "$i"
  if ((i == 0)); then
    env "${env_vars[@]}" "$PYTHON" -m lbq.main "${args[@]}" &
  else
    env "${env_vars[@]}" "$PYTHON" -m lbq.main "${args[@]}" >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "local.sh: $processes processes (coordinator 127.0.0.1:$port), logs of 1..$((processes - 1)) in $logdir" >&2

# SIGTERM/SIGINT go to every process: lbq saves a checkpoint at the next step and exits 75.
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
signalled=0
trap 'signalled=1; forward' INT TERM

# When one process fails, the others would block in a collective until JAX's heartbeat
# timeout; stop them instead (TERM, then KILL after a grace period).
running() {
  local pid live
  live=" $(jobs -rp | tr '\n' ' ') "
  for pid in "${pids[@]}"; do [[ $live == *" $pid "* ]] && return 0; done
  return 1
}
stopping=0
killer=""
while running; do
  rc=0
  wait -n || rc=$?
  # 75 is a clean preemption exit (the others follow once the checkpoint is committed); codes
  # above 128 also mean that a trapped signal interrupted `wait`.
  if ((rc != 0 && rc != 75 && !stopping && (rc < 128 || !signalled))); then
    stopping=1
    echo "local.sh: a process exited with code $rc; stopping the others" >&2
    forward
    (sleep "${LBQ_STOP_GRACE:-30}" && kill -KILL "${pids[@]}" 2>/dev/null) &
    killer=$!
  fi
done
if [[ -n $killer ]]; then kill "$killer" 2>/dev/null || true; fi

status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit "$status"
