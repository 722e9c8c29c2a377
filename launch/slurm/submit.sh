#!/bin/bash
# Submit launch/slurm/pretrain.sbatch after checking the launch, from a login node.
#
#   RECIPE=flash_pretrain NODES=8 GPUS_PER_NODE=8 RUN_DIR=/shared/runs/flash-1 \
#     launch/slurm/submit.sh [overrides...]
#
# Required:  RECIPE         recipe name (recipes/<RECIPE>.yaml)
#            NODES          number of nodes
#            GPUS_PER_NODE  GPUs per node = training processes per node (one srun task per GPU)
#            RUN_DIR        run directory on a shared filesystem; resubmitting with the same RUN_DIR
#                           resumes from its latest complete checkpoint
# Optional:  TIME_LIMIT (04:00:00), PARTITION, ACCOUNT, QOS, JOB_NAME (dsv4-<RECIPE>),
#            CPUS_PER_TASK, SIGNAL_LEAD_S (120: seconds before the time limit at which the ranks
#            are told to save and requeue), VENV (virtualenv to activate on the nodes),
#            SBATCH_EXTRA_ARGS (more sbatch options, word-split)
#
# Before anything is submitted it checks every variable, then composes the config with the
# overrides and validates it for NODES x GPUS_PER_NODE processes (exit 2, one message, on any
# problem). It writes $RUN_DIR/launch/resubmit.sh, which repeats this exact submission.

set -euo pipefail

# shellcheck source=launch/lib/checks.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../lib/checks.sh"  # die, require_var, require_positive_int

# ================================ Configuration =================================================
require_var RECIPE "the recipe to train (a file in recipes/ without .yaml), e.g. RECIPE=flash_pretrain."
require_var NODES "the number of nodes, e.g. NODES=8."
require_var GPUS_PER_NODE "GPUs per node (one training process each), e.g. GPUS_PER_NODE=8."
require_var RUN_DIR "the run directory on a filesystem every node sees; resubmitting with the same RUN_DIR resumes, e.g. RUN_DIR=/shared/runs/flash-1."
require_positive_int NODES "give the number of nodes, e.g. NODES=8."
require_positive_int GPUS_PER_NODE "give the GPUs per node, e.g. GPUS_PER_NODE=8."
SIGNAL_LEAD_S="${SIGNAL_LEAD_S:-120}"
require_positive_int SIGNAL_LEAD_S "seconds before the time limit to signal the ranks, e.g. SIGNAL_LEAD_S=300 for slow saves."
TIME_LIMIT="${TIME_LIMIT:-04:00:00}"
JOB_NAME="${JOB_NAME:-dsv4-${RECIPE}}"
command -v sbatch >/dev/null || die "sbatch is not on PATH: run this on a Slurm login node (locally, use launch/torchrun.sh)."

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="$(realpath -m "${RUN_DIR}")"  # absolute: the job may start in another directory

# ================================ Checks =======================================================
if [[ -n "${VENV:-}" ]]; then
    [[ -f "${VENV}/bin/activate" ]] || die "VENV=${VENV} has no bin/activate; point it at the virtualenv with dsv4-train installed."
    # shellcheck disable=SC1091
    source "${VENV}/bin/activate"
fi
python -m dsv4_train.launch.preflight --label submit.sh --nodes "${NODES}" \
    --procs-per-node "${GPUS_PER_NODE}" -- "conf=${RECIPE}" "run.dir=${RUN_DIR}" "$@"

# ================================ Submission ===================================================
SBATCH_ARGS=(
    --job-name="${JOB_NAME}"
    --nodes="${NODES}"
    --ntasks-per-node="${GPUS_PER_NODE}"
    --gpus-per-node="${GPUS_PER_NODE}"
    --time="${TIME_LIMIT}"
    --signal="USR2@${SIGNAL_LEAD_S}"
    --output="${RUN_DIR}/logs/slurm-%j.out"
    --export=ALL
)
if [[ -n "${PARTITION:-}" ]]; then SBATCH_ARGS+=(--partition="${PARTITION}"); fi
if [[ -n "${ACCOUNT:-}" ]]; then SBATCH_ARGS+=(--account="${ACCOUNT}"); fi
if [[ -n "${QOS:-}" ]]; then SBATCH_ARGS+=(--qos="${QOS}"); fi
if [[ -n "${CPUS_PER_TASK:-}" ]]; then SBATCH_ARGS+=(--cpus-per-task="${CPUS_PER_TASK}"); fi
if [[ -n "${SBATCH_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<< "${SBATCH_EXTRA_ARGS}"
    SBATCH_ARGS+=("${extra[@]}")
fi

mkdir -p "${RUN_DIR}/launch" "${RUN_DIR}/logs"
# One command to submit this run again (after a failure, or to continue past max_steps).
{
    echo "#!/bin/bash"
    echo "# Resubmits this run; it resumes from the latest complete checkpoint in RUN_DIR."
    for var in RECIPE NODES GPUS_PER_NODE RUN_DIR TIME_LIMIT JOB_NAME SIGNAL_LEAD_S PARTITION ACCOUNT QOS CPUS_PER_TASK VENV SBATCH_EXTRA_ARGS; do
        if [[ -n "${!var:-}" ]]; then printf 'export %s=%q\n' "${var}" "${!var}"; fi
    done
    printf 'exec %q' "${SCRIPT_DIR}/submit.sh"
    printf ' %q' "$@"
    echo
} > "${RUN_DIR}/launch/resubmit.sh"
chmod +x "${RUN_DIR}/launch/resubmit.sh"

export RECIPE RUN_DIR
sbatch "${SBATCH_ARGS[@]}" "${SCRIPT_DIR}/pretrain.sbatch" "$@"
echo "submit.sh: logs in ${RUN_DIR}/logs; resubmit with ${RUN_DIR}/launch/resubmit.sh"
