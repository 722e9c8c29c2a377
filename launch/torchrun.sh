#!/bin/bash
# Run dsv4-train on NPROC_PER_NODE processes of this machine with torchrun (or on several machines
# with c10d rendezvous), after checking the launch against the config.
#
#   NPROC_PER_NODE=8 RUN_DIR=runs/flash-dev RECIPE=flash_pretrain launch/torchrun.sh [overrides...]
#
# Required:  NPROC_PER_NODE  processes (GPUs) on this machine
#            RUN_DIR         run directory shared by all ranks; running the same command again
#                            resumes from its latest complete checkpoint
# Optional:  RECIPE (tiny_pretrain)  recipe name (recipes/<RECIPE>.yaml)
#            NNODES (1), and for NNODES > 1: RDZV_ENDPOINT=host:port of the first machine (the same
#            on every machine) and RDZV_ID (a job id shared by the machines)
#            SHUTDOWN_TIMEOUT_S (300)  how long torchrun lets the workers save after a stop signal
#                                      before it kills them
#
# Stop signals: SIGTERM, SIGUSR1 or SIGUSR2 to this script are forwarded to torchrun as SIGTERM,
# which forwards it to every worker; the workers agree at the next step boundary, save a
# checkpoint and exit. This script then exits with 75 (EXIT_PREEMPTED in
# dsv4_train/launch/preemption.py), which the ranks write to $RUN_DIR/logs/exit_code.torchrun.<pid>;
# torchrun alone would not report it. Ctrl-C (SIGINT) stops at once.
# Exit codes: 0 done, 75 saved on a stop signal (run the same command to resume), 2 bad launch or
# config, anything else: a rank failed (see $RUN_DIR/logs/).

set -euo pipefail

# shellcheck source=launch/lib/checks.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib/checks.sh"  # die, require_var, require_positive_int

# ================================ Configuration =================================================
require_var NPROC_PER_NODE "the number of processes (GPUs) on this machine, e.g. NPROC_PER_NODE=8."
require_var RUN_DIR "the run directory all ranks share; the same RUN_DIR resumes, e.g. RUN_DIR=runs/my-run."
require_positive_int NPROC_PER_NODE "give the processes per machine, e.g. NPROC_PER_NODE=8."
RECIPE="${RECIPE:-tiny_pretrain}"
NNODES="${NNODES:-1}"
require_positive_int NNODES "give the number of machines, e.g. NNODES=2."
SHUTDOWN_TIMEOUT_S="${SHUTDOWN_TIMEOUT_S:-300}"
require_positive_int SHUTDOWN_TIMEOUT_S "give the seconds the workers get to save after a stop signal."
if (( NNODES > 1 )); then
    require_var RDZV_ENDPOINT "with NNODES > 1, the host:port of the first machine (the same on all machines), e.g. RDZV_ENDPOINT=node001:29500."
    require_var RDZV_ID "with NNODES > 1, an id the machines share, e.g. RDZV_ID=\$SLURM_JOB_ID."
fi
RUN_DIR="$(realpath -m "${RUN_DIR}")"
OVERRIDES=("conf=${RECIPE}" "run.dir=${RUN_DIR}" "$@")

# ================================ Checks =======================================================
command -v torchrun >/dev/null || die "torchrun is not on PATH: activate the virtualenv with dsv4-train installed."
python -m dsv4_train.launch.preflight --label torchrun.sh --nodes "${NNODES}" \
    --procs-per-node "${NPROC_PER_NODE}" -- "${OVERRIDES[@]}"

# ================================ Environment ==================================================
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT_S}"  # read by torch >= 2.8's torchrun
mkdir -p "${RUN_DIR}/logs"
# Written by the ranks with their documented exit code (75 saved on a stop signal, 3 non-finite,
# 74 checkpoint not written): torchrun itself reports every worker failure as 1.
export DSV4_EXIT_CODE_FILE="${RUN_DIR}/logs/exit_code.torchrun.$$"
rm -f "${DSV4_EXIT_CODE_FILE}"

if (( NNODES > 1 )); then
    RDZV_ARGS=(--nnodes="${NNODES}" --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT}" --rdzv-id="${RDZV_ID}")
else
    RDZV_ARGS=(--standalone --nnodes=1)  # c10d rendezvous on a free local port
fi

# ================================ Execution ====================================================
# Hydra's own per-process files go under logs/hydra/rank_<r>; run.dir is shared by all ranks.
torchrun "${RDZV_ARGS[@]}" --nproc-per-node="${NPROC_PER_NODE}" -m dsv4_train "${OVERRIDES[@]}" \
    "hydra.run.dir=${RUN_DIR}/logs/hydra/rank_\${oc.env:RANK}" &
TORCHRUN_PID=$!
# shellcheck disable=SC2317  # invoked by the trap below
forward_stop() {
    echo "torchrun.sh: stop signal received; the ranks save a checkpoint at the next step and exit" >&2
    kill -TERM "${TORCHRUN_PID}" 2>/dev/null || true
}
trap forward_stop TERM USR1 USR2
trap 'kill -INT "${TORCHRUN_PID}" 2>/dev/null || true' INT

# `wait` also returns when a trapped signal arrives: keep waiting while torchrun runs, then collect
# its exit status (bash remembers it).
while kill -0 "${TORCHRUN_PID}" 2>/dev/null; do
    wait "${TORCHRUN_PID}" || true
done
status=0
wait "${TORCHRUN_PID}" || status=$?
# The ranks' code wins over torchrun's status whatever that is: after a stop signal torchrun may
# report 0 or 1 depending on how its workers ended.
code=""
if [[ -f "${DSV4_EXIT_CODE_FILE}" ]]; then
    code="$(cat "${DSV4_EXIT_CODE_FILE}")"
    rm -f "${DSV4_EXIT_CODE_FILE}"
fi
if [[ "${code}" == 75 ]]; then
    echo "torchrun.sh: checkpoint saved on a stop signal; run the same command to resume" >&2
    exit 75
fi
if [[ "${code}" =~ ^[0-9]+$ ]]; then  # empty when a rank died while writing it
    echo "torchrun.sh: the ranks exited with ${code} (docs/launching.md)" >&2
    exit "${code}"
fi
exit "${status}"
