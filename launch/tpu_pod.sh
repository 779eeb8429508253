#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM pod (one slice, or several with queued resources).
#
#   launch/tpu_pod.sh --project my-proj --zone us-east5-b --name bert-large \
#     --accelerator-type v5litepod-256 --config configs/bert_large.py \
#     --workdir gs://my-bucket/runs/bert-large [--spot] [--num-slices 2] \
#     [--dry-run] [-- --config.train.batch_size=4096 ...]
#
# Steps (each printed before it runs; --dry-run prints them only):
#   1. check inputs locally, then with read-only gcloud queries (project, zone
#      and accelerator type, bucket) before anything is created;
#   2. reuse the TPU VM / queued resource named --name, or create it;
#   3. copy this checkout to every worker of every slice and install the
#      pinned requirements (requirements.txt + requirements-tpu.txt) in a venv;
#   4. start `python -m bert_jax.pretrain` on all workers at once
#      (--worker=all), detached under nohup, logging to ~/bert_jax/pretrain.log.
# The trainer writes the gs:// workdir itself (etils.epath); --gcsfuse mounts the
# buckets of data paths given as config overrides, for sources read as local files.
# jax.distributed.initialize() needs no arguments on TPU VMs; for multi-slice,
# the queued resource sets the MEGASCALE_* variables JAX reads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Flags:
  --project ID            GCP project (required)
  --zone ZONE             e.g. us-east5-b (required)
  --name NAME             TPU VM name; for --num-slices>1 also the queued
                          resource id and the node prefix (nodes NAME-0, NAME-1..)
  --accelerator-type T    v4-N, v5litepod-N, v5p-N or v6e-N (required)
  --runtime-version V     TPU VM image; default by generation (v4:
                          tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
                          v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                  Spot capacity (cheaper, can be preempted)
  --preemptible           legacy preemptible TPU VM (single slice, no queue)
  --num-slices N          N slices over DCN with a queued resource (default 1)
  --queued                use a queued resource even for one slice
  --config FILE           config file inside this project (required)
  --workdir gs://B/PATH   checkpoints and logs, on GCS (required)
  --env KEY=VALUE         extra environment for the trainer (repeatable)
  --skip-install          the workers already have this checkout installed
  --python-version V      Python for the workers' venv (default 3.11)
  --gcsfuse               mount the buckets named in the config overrides (after
                          --) with Cloud Storage FUSE at /tmp/gcs/ on every worker
                          and give the trainer those paths: for data.source
                          prepared/tfrecord/text on GCS (read as local files).
                          The workdir always stays gs:// (the trainer writes it
                          through etils.epath). Default: no mount
  --no-gcsfuse            the default (kept for older command lines)
  --dry-run               print the commands, run nothing that costs money
  -- ARGS                 passed on to bert_jax.pretrain (config overrides)
EOF
}

PROJECT= ZONE= NAME= ACCEL= RUNTIME= SPOT=0 PREEMPTIBLE=0 NUM_SLICES=1 QUEUED=0
CONFIG= WORKDIR= SKIP_INSTALL=0 PYTHON_VERSION=3.11 GCSFUSE=0
TRAINER_ENV=()
PRETRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) need_value "$1" "${2:-}"; PROJECT=$2; shift 2 ;;
    --zone) need_value "$1" "${2:-}"; ZONE=$2; shift 2 ;;
    --name) need_value "$1" "${2:-}"; NAME=$2; shift 2 ;;
    --accelerator-type) need_value "$1" "${2:-}"; ACCEL=$2; shift 2 ;;
    --runtime-version) need_value "$1" "${2:-}"; RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --num-slices) need_value "$1" "${2:-}"; NUM_SLICES=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --config) need_value "$1" "${2:-}"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR=$2; shift 2 ;;
    --env) need_value "$1" "${2:-}"; TRAINER_ENV+=("$2"); shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --python-version) need_value "$1" "${2:-}"; PYTHON_VERSION=$2; shift 2 ;;
    --gcsfuse) GCSFUSE=1; shift ;;
    --no-gcsfuse) GCSFUSE=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PRETRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
done

# --- 1. inputs, checked locally -------------------------------------------
need_set --project "$PROJECT"
need_set --zone "$ZONE"
need_set --name "$NAME"
need_set --accelerator-type "$ACCEL"
need_set --config "$CONFIG"
need_set --workdir "$WORKDIR"
[[ "$PROJECT" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "--project '$PROJECT' is not a valid GCP project id"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone name like us-east5-b"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' must be lowercase letters, digits and dashes"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
[[ "$WORKDIR" =~ ^gs://([a-z0-9][-a-z0-9_.]{1,220}[a-z0-9])(/.*)?$ ]] \
  || die "--workdir must be on GCS (gs://BUCKET/PATH) so every worker sees it, got '$WORKDIR'"
need_config_file "$CONFIG"
for kv in "${TRAINER_ENV[@]+"${TRAINER_ENV[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done
if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then die "--spot and --preemptible are exclusive"; fi
[[ $NUM_SLICES -gt 1 ]] && QUEUED=1
if [[ $QUEUED == 1 && $PREEMPTIBLE == 1 ]]; then
  die "queued resources (and multi-slice) take --spot, not --preemptible"
fi

case "$ACCEL" in
  v4-[0-9]*) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-[0-9]*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-[0-9]*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-[0-9]*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) die "--accelerator-type '$ACCEL' is not one of v4-N, v5litepod-N, v5p-N, v6e-N" ;;
esac
[[ "$ACCEL" =~ ^[a-z0-9]+-[0-9]+$ ]] || die "--accelerator-type '$ACCEL' must end in a core/chip count, like v5p-128"
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}

GCLOUD_SCOPE=(--project "$PROJECT" --zone "$ZONE")
if [[ $QUEUED == 1 && $NUM_SLICES -gt 1 ]]; then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NAME-$i"); done
else
  NODES=("$NAME")
fi

# --- 1b. inputs, checked with read-only queries (free) ----------------------
# A failed check stops a real run before it spends money; a dry run reports it,
# goes on printing the plan, and exits 1 at the end.
FAILED_CHECKS=0
check() {  # check WHAT QUERY...
  local what=$1; shift
  show "$@"
  local rc=0
  query "$@" || rc=$?
  case $rc in
    0) ;;
    3) note "dry run without gcloud: not checked: $what" ;;
    *) [[ "$DRY_RUN" == 1 ]] || die "$what"
       echo "error (dry run goes on): $what" >&2; FAILED_CHECKS=$((FAILED_CHECKS + 1)) ;;
  esac
}
check "project '$PROJECT' not found or not accessible" \
  gcloud projects describe "$PROJECT" '--format=value(projectId)'
check "accelerator type '$ACCEL' is not offered in zone '$ZONE' (or the zone does not exist)" \
  gcloud compute tpus accelerator-types describe "$ACCEL" "${GCLOUD_SCOPE[@]}"
# Every bucket the trainer is given: the workdir's and any in the config overrides.
BUCKETS=()
for word in "$WORKDIR" ${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"}; do
  while [[ "$word" =~ gs://([a-z0-9][-a-z0-9_.]*[a-z0-9])(.*) ]]; do
    [[ " ${BUCKETS[*]+"${BUCKETS[*]}"} " == *" ${BASH_REMATCH[1]} "* ]] || BUCKETS+=("${BASH_REMATCH[1]}")
    word=${BASH_REMATCH[2]}
  done
done
for b in "${BUCKETS[@]}"; do
  check "bucket gs://$b does not exist or is not readable (create it in the TPU's region first)" \
    gcloud storage buckets describe "gs://$b" '--format=value(name)'
done

# --- 2. reuse or create ----------------------------------------------------
exists_rc=0
if [[ $QUEUED == 1 ]]; then
  show gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}"
  query gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" || exists_rc=$?
else
  show gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}"
  query gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}" || exists_rc=$?
fi
CAPACITY=()
[[ $SPOT == 1 ]] && CAPACITY=(--spot)
[[ $PREEMPTIBLE == 1 ]] && CAPACITY=(--preemptible)
if [[ $exists_rc == 0 ]]; then
  note "reusing existing $NAME"
elif [[ $QUEUED == 1 ]]; then
  note "creating queued resource $NAME ($NUM_SLICES x $ACCEL)"
  if [[ $NUM_SLICES -gt 1 ]]; then
    SLICE_FLAGS=(--node-count "$NUM_SLICES" --node-prefix "$NAME")
  else
    SLICE_FLAGS=(--node-id "$NAME")
  fi
  run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_SCOPE[@]}" \
    --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" "${SLICE_FLAGS[@]}" \
    ${CAPACITY[@]+"${CAPACITY[@]}"}
  # The queue grants capacity when it has it: wait for ACTIVE, stop on failure.
  show gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" '--format=value(state.state)'
  while [[ "$DRY_RUN" != 1 ]]; do
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state.state)')
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED|SUSPENDING) die "queued resource $NAME is $state" ;;
      *) note "queued resource $NAME is $state; waiting"; sleep 60 ;;
    esac
  done
else
  note "creating TPU VM $NAME ($ACCEL)"
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}" \
    --accelerator-type "$ACCEL" --version "$RUNTIME" ${CAPACITY[@]+"${CAPACITY[@]}"}
fi

# --- 3. copy and install on every worker -------------------------------------
REMOTE_DIR=bert_jax
if [[ $SKIP_INSTALL == 0 ]]; then
  TARBALL=${TMPDIR:-/tmp}/bert_jax-$NAME.tar.gz
  if git -C "$PROJECT_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Ship exactly what the checkout holds (tracked + untracked-not-ignored files): never
    # venvs, caches or workdirs, and a fixed list keeps tar from failing on files that
    # change while it reads (logs, caches of a run going on beside it).
    FILELIST=${TMPDIR:-/tmp}/bert_jax-$NAME.files
    git -C "$PROJECT_ROOT" ls-files --cached --others --exclude-standard |
      while IFS= read -r f; do [[ -f "$PROJECT_ROOT/$f" ]] && printf '%s\n' "$f"; done > "$FILELIST"
    run tar -czf "$TARBALL" -C "$PROJECT_ROOT" -T "$FILELIST"
  else
    run tar -czf "$TARBALL" -C "$PROJECT_ROOT" --exclude=.git --exclude=.venv --exclude=.cache \
      --exclude=workdirs --exclude=__pycache__ --exclude="$(basename "$TARBALL")" .
  fi
  INSTALL="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$(basename "$TARBALL") -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
  # TPU VM images ship Python 3.10; the pins need 3.11, which uv fetches.
  UV='~/.local/bin/uv'
  INSTALL+=" && python3 -m pip install -q --user uv && $UV venv -q --python $PYTHON_VERSION .venv"
  INSTALL+=" && $UV pip install -q --python .venv/bin/python -r requirements.txt -r requirements-tpu.txt"
  INSTALL+=" && $UV pip install -q --python .venv/bin/python --no-deps -e ."
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$node:~/" "${GCLOUD_SCOPE[@]}" --worker=all
    run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_SCOPE[@]}" --worker=all --command "$INSTALL"
  done
fi

# --- 4. start the trainer on all workers of all slices -------------------------
PRETRAIN=(.venv/bin/python -m bert_jax.pretrain --config "$CONFIG" --workdir "$WORKDIR")
FIRST_OVERRIDE=${#PRETRAIN[@]}
PRETRAIN+=(${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"})
# Buckets named in the config overrides (data paths), mounted only with --gcsfuse.
DATA_BUCKETS=()
for word in ${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"}; do
  while [[ "$word" =~ gs://([a-z0-9][-a-z0-9_.]*[a-z0-9])(.*) ]]; do
    [[ " ${DATA_BUCKETS[*]+"${DATA_BUCKETS[*]}"} " == *" ${BASH_REMATCH[1]} "* ]] || DATA_BUCKETS+=("${BASH_REMATCH[1]}")
    word=${BASH_REMATCH[2]}
  done
done
if [[ $GCSFUSE == 1 && ${#DATA_BUCKETS[@]} -eq 0 ]]; then
  note "--gcsfuse: no gs:// path among the config overrides; nothing to mount"
elif [[ $GCSFUSE == 1 ]]; then
  # Prepared shards and TFRecords are read as local files (memory maps, pread): mount
  # their buckets with Cloud Storage FUSE at the same path on every worker and hand
  # the trainer /tmp/gcs/BUCKET/... for gs://BUCKET/... in the overrides (after
  # --config and --workdir, which stay as given).
  for ((i = FIRST_OVERRIDE; i < ${#PRETRAIN[@]}; i++)); do
    for b in "${DATA_BUCKETS[@]}"; do PRETRAIN[$i]=${PRETRAIN[$i]//gs:\/\/$b/\/tmp\/gcs\/$b}; done
  done
  MOUNT="command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
  for b in "${DATA_BUCKETS[@]}"; do
    MOUNT+=" && mkdir -p /tmp/gcs/$b && { mountpoint -q /tmp/gcs/$b || gcsfuse --implicit-dirs $b /tmp/gcs/$b; }"
  done
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_SCOPE[@]}" --worker=all --command "$MOUNT"
  done
fi
START="cd ~/$REMOTE_DIR && nohup env $(quote_words ${TRAINER_ENV[@]+"${TRAINER_ENV[@]}"} "${PRETRAIN[@]}")"
START+=" > pretrain.log 2>&1 < /dev/null &"
for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_SCOPE[@]}" --worker=all --command "$START"
done
note "started on ${#NODES[@]} slice(s). Follow worker 0 with:"
note "  gcloud compute tpus tpu-vm ssh ${NODES[0]} --project $PROJECT --zone $ZONE --worker=0 --command 'tail -f ~/$REMOTE_DIR/pretrain.log'"
note "TensorBoard: tensorboard --logdir $WORKDIR"
if [[ $FAILED_CHECKS -gt 0 ]]; then
  die "$FAILED_CHECKS input check(s) failed (see above); a real run would have stopped before creating anything"
fi
