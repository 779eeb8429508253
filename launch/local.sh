#!/usr/bin/env bash
# Pretrain on this machine: one process (all local devices), or N processes on
# this host joined by jax.distributed with an explicit coordinator, to test the
# multi-host code paths (data sharding per host, checkpoints, preemption)
# without a cluster.
#
#   launch/local.sh --config configs/demo.py --workdir workdirs/demo
#   launch/local.sh --config configs/demo.py --workdir workdirs/demo2 \
#     --num-processes 2 --cpu-devices 4        # 2 processes x 4 fake CPU devices
#   launch/local.sh ... --num-processes 2 --gpus-per-process 4   # 8 GPUs, 2 processes
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Flags:
  --config FILE           config file inside this project (required)
  --workdir DIR           checkpoints and logs (required)
  --num-processes N       processes on this host (default 1)
  --cpu-devices K         with N>1: each process gets K fake CPU devices (default 2)
  --gpus-per-process K    with N>1: process i gets GPUs i*K..i*K+K-1 (CUDA_VISIBLE_DEVICES)
  --port P                coordinator port on 127.0.0.1 (default: a free one)
  --python PATH           interpreter (default .venv/bin/python, else python3)
  --dry-run               print the commands only
  -- ARGS                 passed on to bert_jax.pretrain (config overrides)
Process i>0 logs to WORKDIR.logs/process_i.log; process 0 prints to the terminal
(and to WORKDIR.logs/process_0.log). Ctrl-C / SIGTERM is passed to every process
(the trainer saves a checkpoint and exits); if one process fails the others are stopped.
EOF
}

CONFIG= WORKDIR= NUM_PROCESSES=1 CPU_DEVICES= GPUS_PER_PROCESS= PORT= PYTHON=
PRETRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$1" "${2:-}"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR=$2; shift 2 ;;
    --num-processes) need_value "$1" "${2:-}"; NUM_PROCESSES=$2; shift 2 ;;
    --cpu-devices) need_value "$1" "${2:-}"; CPU_DEVICES=$2; shift 2 ;;
    --gpus-per-process) need_value "$1" "${2:-}"; GPUS_PER_PROCESS=$2; shift 2 ;;
    --port) need_value "$1" "${2:-}"; PORT=$2; shift 2 ;;
    --python) need_value "$1" "${2:-}"; PYTHON=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PRETRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
done

need_set --config "$CONFIG"
need_set --workdir "$WORKDIR"
need_config_file "$CONFIG"
for pair in "--num-processes:$NUM_PROCESSES" "--cpu-devices:${CPU_DEVICES:-1}" \
            "--gpus-per-process:${GPUS_PER_PROCESS:-1}" "--port:${PORT:-1}"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ -n "$CPU_DEVICES" && -n "$GPUS_PER_PROCESS" ]] && die "--cpu-devices and --gpus-per-process are exclusive"
if [[ -z "$PYTHON" ]]; then
  PYTHON=$PROJECT_ROOT/.venv/bin/python
  [[ -x "$PYTHON" ]] || PYTHON=python3
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python not found: $PYTHON (pass --python)"
cd "$PROJECT_ROOT"
PRETRAIN=("$PYTHON" -m bert_jax.pretrain --config "$CONFIG" --workdir "$WORKDIR")
PRETRAIN+=(${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"})

if [[ $NUM_PROCESSES == 1 ]]; then
  [[ -n "$GPUS_PER_PROCESS" ]] && source "$PROJECT_ROOT/launch/gpu_env.sh"
  ENV=()
  [[ -n "$CPU_DEVICES" ]] && ENV=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES)
  if [[ "$DRY_RUN" == 1 ]]; then run ${ENV[@]+"${ENV[@]}"} "${PRETRAIN[@]}"; exit 0; fi
  show ${ENV[@]+"${ENV[@]}"} "${PRETRAIN[@]}"
  exec ${ENV[@]+"${ENV[@]}"} "${PRETRAIN[@]}"
fi

# --- N processes on this host ---------------------------------------------------
if [[ -z "$PORT" ]]; then
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -n "$GPUS_PER_PROCESS" ]]; then
  source "$PROJECT_ROOT/launch/gpu_env.sh"
else
  CPU_DEVICES=${CPU_DEVICES:-2}
fi
LOG_DIR=${WORKDIR%/}.logs
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
note "$NUM_PROCESSES processes, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"

PIDS=()
stop_all() {  # signal every process we started, by pid
  local pid
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'note "passing SIGTERM to the trainers"; stop_all TERM' TERM INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  if [[ -n "$GPUS_PER_PROCESS" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    visible=$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))
    ENV=(env CUDA_VISIBLE_DEVICES=$visible)
  else
    ENV=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES)
  fi
  CMD=("${ENV[@]}" "${PRETRAIN[@]}" --config.distributed.coordinator_address=127.0.0.1:$PORT
       --config.distributed.num_processes=$NUM_PROCESSES --config.distributed.process_id=$i)
  show "${CMD[@]}"
  [[ "$DRY_RUN" == 1 ]] && continue
  if [[ $i == 0 ]]; then
    "${CMD[@]}" > >(tee "$LOG_DIR/process_0.log") 2>&1 &
  else
    "${CMD[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  PIDS+=($!)
done
[[ "$DRY_RUN" == 1 ]] && exit 0

# Wait for all, polling so a signal never interrupts the bookkeeping; the first
# failure stops the rest (a lone survivor would hang in a collective).
status=0
running=("${PIDS[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0
    wait "$pid" || rc=$?
    if [[ $rc != 0 && $status == 0 ]]; then
      status=$rc
      note "process $pid exited with status $rc; stopping the others (see $LOG_DIR)"
      stop_all TERM
    fi
  done
  running=(${still[@]+"${still[@]}"})
  [[ ${#running[@]} -gt 0 ]] && sleep 1
done
exit $status
