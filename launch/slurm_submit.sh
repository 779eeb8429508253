#!/usr/bin/env bash
# Check the inputs, then submit launch/slurm_gpu.sbatch with the resources on the
# command line (they override the #SBATCH defaults in the script).
#
#   launch/slurm_submit.sh --nodes 4 --gpus-per-node 8 --partition gpu \
#     --config configs/bert_large.py --workdir /shared/runs/bert-large \
#     [--per-node] [--dry-run] [-- --config.train.global_batch_size=2048]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Flags:
  --nodes N             nodes (default 1)
  --gpus-per-node G     GPUs per node (default 8)
  --cpus-per-gpu C      CPU cores per GPU for the data loader (default 8)
  --partition P         SLURM partition (checked with sinfo)
  --account A           SLURM account
  --time T              time limit, e.g. 24:00:00 (default 24:00:00)
  --job-name NAME       default bert_jax
  --per-node            one process per node driving all its GPUs
                        (default: one process per GPU)
  --config FILE         config file inside this project (required)
  --workdir DIR         checkpoints and logs on a filesystem all nodes share (required)
  --venv DIR            the project's venv, visible on all nodes (default .venv)
  --dry-run             print the sbatch command, submit nothing
  -- ARGS               passed on to bert_jax.pretrain (config overrides)
EOF
}

NODES=1 GPUS=8 CPUS_PER_GPU=8 PARTITION= ACCOUNT= TIME=24:00:00 JOB_NAME=bert_jax PER_NODE=0
CONFIG= WORKDIR= VENV=$PROJECT_ROOT/.venv
PRETRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need_value "$1" "${2:-}"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" "${2:-}"; GPUS=$2; shift 2 ;;
    --cpus-per-gpu) need_value "$1" "${2:-}"; CPUS_PER_GPU=$2; shift 2 ;;
    --partition) need_value "$1" "${2:-}"; PARTITION=$2; shift 2 ;;
    --account) need_value "$1" "${2:-}"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$1" "${2:-}"; TIME=$2; shift 2 ;;
    --job-name) need_value "$1" "${2:-}"; JOB_NAME=$2; shift 2 ;;
    --per-node) PER_NODE=1; shift ;;
    --config) need_value "$1" "${2:-}"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$1" "${2:-}"; VENV=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PRETRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
done

need_set --config "$CONFIG"
need_set --workdir "$WORKDIR"
for pair in "--nodes:$NODES" "--gpus-per-node:$GPUS" "--cpus-per-gpu:$CPUS_PER_GPU"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ "$TIME" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time '$TIME' is not a SLURM time like 24:00:00 or 2-00:00:00"
need_config_file "$CONFIG"
[[ "$WORKDIR" == /* ]] || die "--workdir must be an absolute path on a filesystem every node mounts, got '$WORKDIR'"
WORKDIR_PARENT=$(dirname "$WORKDIR")
[[ -d "$WORKDIR_PARENT" ]] || die "--workdir's parent $WORKDIR_PARENT does not exist (is the shared filesystem mounted here?)"
[[ -w "$WORKDIR_PARENT" ]] || die "--workdir's parent $WORKDIR_PARENT is not writable"
[[ -x "$VENV/bin/python" ]] || die "no Python at $VENV/bin/python; run 'make install' (with jax[cuda12]==0.10.2) or pass --venv"
if ! command -v sbatch >/dev/null 2>&1; then
  [[ "$DRY_RUN" == 1 ]] || die "sbatch not found: run this on a SLURM login node"
  note "dry run: sbatch not found here; printing the command only"
fi
if [[ -n "$PARTITION" ]] && command -v sinfo >/dev/null 2>&1; then
  [[ -n "$(sinfo --noheader --partition "$PARTITION" --format=%P 2>/dev/null)" ]] \
    || die "SLURM partition '$PARTITION' not found (see: sinfo --summarize)"
fi

if [[ $PER_NODE == 1 ]]; then
  TASKS_PER_NODE=1 CPUS_PER_TASK=$((CPUS_PER_GPU * GPUS)) SCRIPT_FLAGS=(--per-node)
else
  TASKS_PER_NODE=$GPUS CPUS_PER_TASK=$CPUS_PER_GPU SCRIPT_FLAGS=()
fi
SBATCH=(sbatch --chdir="$PROJECT_ROOT" --job-name="$JOB_NAME" --nodes="$NODES"
  --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS_PER_TASK"
  --time="$TIME")
[[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")
SBATCH+=("$PROJECT_ROOT/launch/slurm_gpu.sbatch" --config "$CONFIG" --workdir "$WORKDIR" --venv "$VENV")
SBATCH+=(${SCRIPT_FLAGS[@]+"${SCRIPT_FLAGS[@]}"})
[[ ${#PRETRAIN_ARGS[@]} -gt 0 ]] && SBATCH+=(-- "${PRETRAIN_ARGS[@]}")
note "$NODES node(s) x $GPUS GPU(s); $((NODES * TASKS_PER_NODE)) process(es)"
run "${SBATCH[@]}"
