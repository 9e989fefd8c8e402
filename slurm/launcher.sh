#!/usr/bin/env bash
# Per-task launcher shared by every sbatch template: turns SLURM's environment into the
# torch.distributed one, then execs the command.
#
#   srun slurm/launcher.sh [--torchrun] [--nproc-per-node N] [--] CMD [ARGS...]
#
# Mode "task" (default, one SLURM task per GPU/process): RANK=SLURM_PROCID,
#   WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID, LOCAL_WORLD_SIZE=tasks on this node.
# Mode "torchrun" (one SLURM task per node): execs `torchrun --no-python` with
#   --nnodes=SLURM_NNODES --node-rank=SLURM_NODEID --nproc-per-node=N (default: GPUs on the node,
#   else 1), forwarding SIGUSR1 to the workers so preemption checkpoints still happen.
# Both: MASTER_ADDR = address of the first node of the step (NodeAddr from scontrol, so virtual
#   nodes of a test cluster resolve to 127.0.0.1), MASTER_PORT = 20000 + job id % 20000,
#   OMP_NUM_THREADS from --cpus-per-task. Everything already set in the environment wins.
# GPU defaults (only when GPUs are visible, each overridable): NCCL_NVLS_ENABLE=0,
#   CUDA_DEVICE_MAX_CONNECTIONS=1, TORCH_NCCL_ASYNC_ERROR_HANDLING=3, NCCL_DEBUG=WARN.
set -euo pipefail

MODE=task
NPROC=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --torchrun) MODE=torchrun; shift ;;
        --nproc-per-node) NPROC="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "launcher.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "launcher.sh: no command given; usage: srun slurm/launcher.sh [--torchrun] -- CMD [ARGS...]" >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_PROCID:-}" ]]; then
    echo "launcher.sh: not inside a SLURM step (SLURM_JOB_ID/SLURM_PROCID unset); run it through srun" >&2
    exit 2
fi

# ---- first node's address ------------------------------------------------------------------
node_addr() {  # node_addr NAME -> NodeAddr of a SLURM node (falls back to NAME)
    local addr
    addr="$(timeout 10 scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)"
    echo "${addr:-$1}"
}
if [[ -z "${MASTER_ADDR:-}" ]]; then
    NODELIST="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?}}"
    FIRST_NODE="$(timeout 10 scontrol show hostnames "$NODELIST" | head -n1)"
    MASTER_ADDR="$(node_addr "$FIRST_NODE")"
fi
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# ---- GPUs and their defaults ---------------------------------------------------------------
gpus_on_node() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NUM_GPUS="$(gpus_on_node)"
if [[ "${NUM_GPUS:-0}" -gt 0 ]]; then
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
fi

# ---- tasks on this node (SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1") ----------------------
tasks_on_node() {
    local spec="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" node="${SLURM_NODEID:-0}" i=0 part n rep
    IFS=',' read -ra parts <<<"$spec"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then n="${BASH_REMATCH[1]}"; rep="${BASH_REMATCH[2]}"
        else n="$part"; rep=1; fi
        if ((node < i + rep)); then echo "$n"; return; fi
        i=$((i + rep))
    done
    echo 1
}

CPUS="${SLURM_CPUS_PER_TASK:-1}"
if [[ "$MODE" == task ]]; then
    export RANK="$SLURM_PROCID"
    export WORLD_SIZE="${SLURM_NTASKS:-${SLURM_NPROCS:-1}}"
    export LOCAL_RANK="${SLURM_LOCALID:-0}"
    export LOCAL_WORLD_SIZE="$(tasks_on_node)"
    export NODE_RANK="${SLURM_NODEID:-0}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$CPUS}"
    if [[ "$RANK" == 0 ]]; then
        echo "launcher: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) mode=task world=$WORLD_SIZE" \
             "nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}} master=$MASTER_ADDR:$MASTER_PORT gpus/node=$NUM_GPUS" >&2
    fi
    exec "$@"
fi

# torchrun: one task per node
if [[ -z "$NPROC" ]]; then
    NPROC="${OSP_NPROC_PER_NODE:-$NUM_GPUS}"
    [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
NNODES="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"
if [[ "${SLURM_STEP_NUM_TASKS:-$NNODES}" != "$NNODES" ]]; then
    echo "launcher.sh: --torchrun wants one SLURM task per node (got ${SLURM_STEP_NUM_TASKS} tasks on $NNODES nodes);" \
         "use srun --ntasks-per-node=1" >&2
    exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}"
TORCHRUN="${TORCHRUN:-torchrun}"
EXTRA=()
# torch >= 2.8 can forward SIGUSR1 to the workers; older torchrun would die on it.
if "$TORCHRUN" --help 2>/dev/null | grep -q -- '--signals-to-handle'; then
    EXTRA+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
            --shutdown-timeout "${OSP_SHUTDOWN_TIMEOUT:-600}")
fi
if [[ "${SLURM_NODEID:-0}" == 0 ]]; then
    echo "launcher: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) mode=torchrun nodes=$NNODES" \
         "nproc/node=$NPROC master=$MASTER_ADDR:$MASTER_PORT gpus/node=$NUM_GPUS" >&2
fi
exec "$TORCHRUN" --nnodes="$NNODES" --node-rank="${SLURM_NODEID:-0}" --nproc-per-node="$NPROC" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 "${EXTRA[@]}" \
    --no-python "$@"
