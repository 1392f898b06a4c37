#!/usr/bin/env bash
# Train lbq on a Cloud TPU VM (one host or a multi-host pod slice): create it, install lbq on
# every worker, start the run on every worker, follow it, stop it, delete the TPU.
#
#   launch/tpu_vm.sh --name=lbq-v5e --zone=us-west4-a --project=my-project \
#     --accelerator-type=v5litepod-16 --config=configs/imagenet_w2a2.py \
#     --workdir=gs://my-bucket/runs/imagenet_w2a2
#   launch/tpu_vm.sh --name=lbq-v5e --zone=us-west4-a --action=logs
#   launch/tpu_vm.sh --name=lbq-v5e --zone=us-west4-a --action=delete
#
# Actions (--action, default all = create + install + run):
#   create   create the TPU VM (--queued: through a queued resource, waiting until it is
#            ACTIVE); an existing TPU of that name is reused (--reuse skips the check)
#   install  copy lbq to ~/lbq on every worker (--source) and install it with "jax[tpu]" into
#            ~/lbq-venv (Python --python, through uv: the TPU images are Ubuntu 22.04 with
#            Python 3.10, and jax >= 0.10 needs 3.11+); with a gs:// workdir and
#            --gcs=fuse, also gcsfuse
#   run      start `python -m lbq.main` on every worker, detached (nohup), LBQ_DISTRIBUTED=1:
#            jax.distributed.initialize() finds the other workers by itself on Cloud TPU.
#            Log: ~/lbq-run.log on each worker. Rerunning resumes from the workdir.
#   logs     follow worker 0's log (--worker=N for another)
#   stop     SIGTERM the run on every worker: lbq saves a checkpoint and exits
#   delete   delete the TPU VM (and its queued resource)
#
# Flags:
#   --name NAME                TPU name (required)
#   --zone ZONE                zone (required)
#   --project PROJECT          project (default: gcloud's configured project)
#   --accelerator-type TYPE    e.g. v4-8, v5litepod-16, v5p-32, v6e-8 (default v5litepod-8)
#   --version VERSION          TPU software version (default: from the accelerator type)
#   --queued                   create through a queued resource
#   --spot                     Spot capacity (preemptible; rerun --action=run to resume)
#   --reuse                    use an existing TPU VM without checking for it
#   --source local|GIT_URL[@REF]
#                              local (default): this checkout, uncommitted files included, as
#                              a tarball copied with scp --worker=all; or a git URL to clone
#   --python VERSION           Python of ~/lbq-venv on the workers (default 3.12)
#   --config CONFIG            config file, relative to the repository root (run)
#   --workdir DIR              run directory; gs://BUCKET/PATH for a multi-host slice (run)
#   --gcs fuse|native          fuse (default): mount the bucket on every worker with gcsfuse
#                              and give lbq the mounted path; native: pass gs:// to lbq as is
#   --dry-run                  print every command, run none
#   -- ARGS...                 more lbq.main flags, e.g. -- --config.batch_size=1024
set -euo pipefail
LAUNCHER=tpu_vm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="" zone="" project="" accelerator="v5litepod-8" version="" action="all"
queued=0 spot=0 reuse=0 source_spec="local" python_version="3.12" config="" workdir=""
gcs_mode="fuse" dry_run=${DRY_RUN:-0} log_worker=0
extra=()

while (($#)); do
  arg=$1
  value=""
  if [[ $arg == --*=* ]]; then
    value=${arg#*=}
    arg=${arg%%=*}
  fi
  case "$arg" in
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --reuse) reuse=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    --name | --zone | --project | --accelerator-type | --version | --action | --source | \
      --python | --config | --workdir | --gcs | --worker)
      if [[ -z $value ]]; then
        (($# >= 2)) && [[ $2 != -* ]] || die "$arg needs a value"
        value=$2
        shift
      fi
      case "$arg" in
        --name) name=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --accelerator-type) accelerator=$value ;;
        --version) version=$value ;;
        --action) action=$value ;;
        --source) source_spec=$value ;;
        --python) python_version=$value ;;
        --config) config=$value ;;
        --workdir) workdir=$value ;;
        --gcs) gcs_mode=$value ;;
        --worker) log_worker=$value ;;
      esac
      ;;
    *) die "unknown argument '$1' (see --help; lbq.main flags go after --)" ;;
  esac
  shift
done

# Whether $1 is an upper-case placeholder copied from an example, such as ZONE or MY_BUCKET.
is_placeholder() { [[ $1 =~ ^[A-Z][A-Z0-9_]*$ ]]; }

# Why $1 is not a valid Cloud Storage bucket name (nothing if it is valid), after the rules
# of https://cloud.google.com/storage/docs/naming-buckets.
bucket_problem() {
  local bucket=$1 part
  if is_placeholder "$bucket"; then
    echo "'$bucket' is a placeholder; put your bucket's name there, e.g. gs://my-bucket/run"
  elif [[ $bucket =~ [A-Z] ]]; then
    echo "bucket name '$bucket' has upper-case letters; Cloud Storage bucket names are lower-case"
  elif [[ ! $bucket =~ ^[a-z0-9._-]+$ ]]; then
    echo "bucket name '$bucket' may hold only lower-case letters, digits, '-', '_' and '.'"
  elif [[ ! $bucket =~ ^[a-z0-9](.*[a-z0-9])?$ ]]; then
    echo "bucket name '$bucket' must start and end with a letter or digit"
  elif ((${#bucket} < 3)) || { [[ $bucket != *.* ]] && ((${#bucket} > 63)); } ||
    ((${#bucket} > 222)); then
    echo "bucket name '$bucket' must have 3 to 63 characters (up to 222 with dots)"
  elif [[ $bucket =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "bucket name '$bucket' is an IP address, which Cloud Storage does not allow"
  elif [[ $bucket == goog* || $bucket == *google* ]]; then
    echo "bucket name '$bucket' starts with 'goog' or holds 'google', which Cloud Storage reserves"
  else
    for part in ${bucket//./ }; do
      if ((${#part} > 63)); then
        echo "bucket name '$bucket' has a dot-separated part longer than 63 characters"
        return
      fi
    done
  fi
}

[[ -n $name ]] || die "--name is required (the TPU VM's name)"
# TPU names follow the Compute Engine resource-name rule (RFC 1035).
is_placeholder "$name" && die "--name=$name is a placeholder; name the TPU VM, e.g. --name=lbq-v5e"
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name '$name' must be 1-63 lower-case letters, digits or '-', starting with a letter"
[[ -n $zone ]] || die "--zone is required, e.g. --zone=us-west4-a"
is_placeholder "$zone" && die "--zone=$zone is a placeholder; give a TPU zone, e.g. --zone=us-west4-a"
[[ $zone =~ ^[a-z0-9-]+$ ]] || die "--zone '$zone' is not a zone name such as us-west4-a"
if [[ -n $project ]]; then
  is_placeholder "$project" &&
    die "--project=$project is a placeholder; give your project ID, e.g. --project=my-project"
  # Project IDs: 6-30 lower-case letters, digits or hyphens (older ones may be domain-scoped).
  [[ $project =~ ^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
    die "--project '$project' is not a project ID (6-30 lower-case letters, digits or '-')"
fi
[[ $accelerator =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type '$accelerator' is not a TPU type such as v5litepod-16 or v4-8"
[[ $log_worker =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0, 1, ...), got '$log_worker'"
case "$action" in
  create | install | run | logs | stop | delete | all) ;;
  *) die "--action must be create, install, run, logs, stop, delete or all; got '$action'" ;;
esac
case "$gcs_mode" in fuse | native) ;; *) die "--gcs must be fuse or native, got '$gcs_mode'" ;; esac
if [[ $action == run || $action == all ]]; then
  [[ -n $config ]] || die "--config is required to run, e.g. --config=configs/imagenet_w2a2.py"
  [[ -n $workdir ]] || die "--workdir is required to run, e.g. --workdir=gs://my-bucket/runs/NAME"
  if [[ $source_spec == local && ! -f "$(dirname "$0")/../${config%%:*}" ]]; then
    die "--config '$config' is not a file of this checkout (paths are relative to its root)"
  fi
  if [[ $workdir == gs://* ]]; then
    bucket=${workdir#gs://}
    bucket=${bucket%%/*}
    problem=$(bucket_problem "$bucket")
    [[ -z $problem ]] || die "--workdir=$workdir: $problem"
  else
    echo "tpu_vm.sh: warning: --workdir '$workdir' is on each worker's own disk; a multi-host" \
      "slice needs a shared workdir such as gs://BUCKET/PATH" >&2
  fi
fi

if [[ -z $version ]]; then
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

# Prints a command, then runs it unless this is a dry run.
run() {
  show "$@"
  [[ $dry_run == 1 ]] || "$@"
}

# Runs a shell command on every worker.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# Quotes words for the workers' bash.
quote() {
  local out="" word
  for word in "$@"; do out+="$(printf '%q' "$word") "; done
  echo "${out% }"
}

do_create() {
  if ((reuse)); then
    echo "# --reuse: using the existing TPU VM $name"
    return
  fi
  local describe=(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)')
  if [[ $dry_run == 1 ]]; then
    show "${describe[@]}"
    echo "# (if it exists, it is reused and nothing is created)"
  elif state=$("${describe[@]}" 2>/dev/null); then
    echo "tpu_vm.sh: TPU VM $name exists (state $state); reusing it" >&2
    return
  fi
  local capacity=()
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${capacity[@]}"
    local poll=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
      --format='value(state.state)')
    if [[ $dry_run == 1 ]]; then
      show "${poll[@]}"
      echo "# (repeated every 30 s until the state is ACTIVE)"
      return
    fi
    local state=""
    while [[ $state != ACTIVE ]]; do
      state=$("${poll[@]}")
      case "$state" in
        FAILED | SUSPENDED) die "queued resource $name is $state" ;;
        ACTIVE) ;;
        *) echo "tpu_vm.sh: queued resource $name is ${state:-pending}; waiting" >&2; sleep 30 ;;
      esac
    done
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      --accelerator-type="$accelerator" --version="$version" "${capacity[@]}"
  fi
}

do_install() {
  local repo
  repo=$(cd "$(dirname "$0")/.." && pwd)
  if [[ $source_spec == local ]]; then
    git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      die "$repo is not a git checkout; use --source=GIT_URL"
    local tarball="${TMPDIR:-/tmp}/lbq-$name.tar.gz"
    # Tracked and untracked files, without what .gitignore excludes (virtualenvs, runs).
    local pack
    pack="cd $(quote "$repo") && git ls-files -z --cached --others --exclude-standard"
    pack+=" | tar --null --files-from=- --ignore-failed-read -czf $(quote "$tarball")"
    run bash -c "$pack"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:lbq.tar.gz" "${where[@]}" --worker=all
    on_all_workers "rm -rf ~/lbq && mkdir -p ~/lbq && tar -xzf ~/lbq.tar.gz -C ~/lbq"
  else
    local url=$source_spec ref=""
    # A trailing @REF (branch or tag) after the repository path, not the one of git@host:.
    if [[ $url =~ ^(.+/[^/@]+)@([^/@]+)$ ]]; then
      url=${BASH_REMATCH[1]}
      ref=${BASH_REMATCH[2]}
    fi
    local clone="git clone --depth=1"
    [[ -n $ref ]] && clone+=" --branch=$(quote "$ref")"
    on_all_workers "rm -rf ~/lbq && $clone $(quote "$url") ~/lbq"
  fi
  local setup="set -e; python3 -m pip install --user --quiet --upgrade uv"
  setup+=" || curl -LsSf https://astral.sh/uv/install.sh | sh"
  setup+="; [ -x ~/lbq-venv/bin/python ] || ~/.local/bin/uv venv --python $(quote "$python_version") ~/lbq-venv"
  setup+="; ~/.local/bin/uv pip install --python ~/lbq-venv/bin/python --quiet 'jax[tpu]' -e ~/lbq"
  setup+="; ~/lbq-venv/bin/python -c 'import jax, lbq; print(\"jax\", jax.__version__)'"
  on_all_workers "$setup"
  if [[ $workdir == gs://* && $gcs_mode == fuse ]]; then
    # Cloud Storage FUSE from Google's apt repository.
    local fuse="command -v gcsfuse >/dev/null || { set -e"
    fuse+="; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    fuse+=" | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg"
    fuse+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg]"
    fuse+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
    fuse+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    fuse+="; sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }"
    on_all_workers "$fuse"
  fi
}

do_run() {
  local remote_workdir mount=""
  if [[ $workdir == gs://* && $gcs_mode == fuse ]]; then
    local path=${workdir#gs://}
    local bucket=${path%%/*}
    local rest=${path#"$bucket"}
    # Directory renames (Orbax finalises a checkpoint by renaming its temporary folder) need
    # --rename-dir-limit on buckets without hierarchical namespace.
    mount="mkdir -p ~/gcs/$bucket && { mountpoint -q ~/gcs/$bucket ||"
    mount+=" gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket ~/gcs/$bucket; } && "
    remote_workdir="\"\$HOME\"/gcs/$bucket$(quote "$rest")"
    [[ -n $rest ]] || remote_workdir="\"\$HOME\"/gcs/$bucket"
  else
    remote_workdir=$(quote "$workdir")
  fi
  local train="LBQ_DISTRIBUTED=1 setsid nohup ~/lbq-venv/bin/python -m lbq.main"
  train+=" --config=$(quote "$config") --workdir=$remote_workdir"
  ((${#extra[@]})) && train+=" $(quote "${extra[@]}")"
  local busy="if [ -f ~/lbq-run.pid ] && kill -0 \$(cat ~/lbq-run.pid) 2>/dev/null; then"
  busy+=" echo \"lbq is already running on \$(hostname); stop it first (--action=stop)\" >&2;"
  busy+=" exit 1; fi"
  on_all_workers "$busy; ${mount}cd ~/lbq && { $train > ~/lbq-run.log 2>&1 < /dev/null & echo \$! > ~/lbq-run.pid; }"
  echo
  if [[ $dry_run == 1 ]]; then
    echo "# A real run starts lbq on every worker of $name (workdir $workdir)."
    echo "# Follow worker 0's log with:"
  else
    echo "Started on every worker of $name (workdir $workdir). Follow worker 0's log with:"
  fi
  echo "  $(show gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 \
    --command='tail -n 100 -f ~/lbq-run.log' | cut -c3-)"
  echo "or: launch/tpu_vm.sh --name=$name --zone=$zone${project:+ --project=$project} --action=logs"
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$log_worker" \
    --command='tail -n 100 -f ~/lbq-run.log'
}

do_stop() {
  on_all_workers "[ -f ~/lbq-run.pid ] && kill -TERM \$(cat ~/lbq-run.pid) 2>/dev/null || true"
}

do_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

case "$action" in
  all) do_create; do_install; do_run ;;
  *) "do_$action" ;;
esac
if [[ $dry_run == 1 ]]; then
  echo "# Dry run: the commands above were only printed; nothing was created, copied or started."
fi
