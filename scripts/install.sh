#!/usr/bin/env bash
# Install dsv4-train into the active Python environment.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     plus the test extras (pytest, transformers, the Slurm and sweep plugins)
#   scripts/install.sh sweep    plus Optuna sweeps and sweep reports (hydra-optuna-sweeper, matplotlib)
# On a machine without CUDA this installs the CPU build of torch 2.13.0 first, so pip never resolves
# a multi-GB CUDA build, then megatron-core 0.19.2 (its cp311 wheel works on Python 3.11 although
# its metadata says >=3.12, hence --ignore-requires-python; numpy is installed first so that flag
# cannot pick a numpy sdist that needs 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
case "$extras" in
  ""|test|wandb|slurm|sweep) ;;
  *) echo "scripts/install.sh: unknown extra '$extras' (use: test, wandb, slurm, sweep, or nothing)" >&2; exit 2 ;;
esac

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  echo "scripts/install.sh: activate a virtual environment first (python3 -m venv .venv && . .venv/bin/activate)" >&2
  exit 2
fi

pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==2.13.0"
  fi
fi
pip_install numpy "packaging>=24.2"
python -m pip show megatron-core >/dev/null 2>&1 || pip_install --no-deps --ignore-requires-python "megatron-core==0.19.2"
if [ -n "$extras" ]; then
  pip_install -e ".[$extras]"
else
  pip_install -e .
fi
# Transformer Engine breaks `import megatron.core` on machines without CUDA (it loads CUDA libraries at import).
if ! command -v nvidia-smi >/dev/null 2>&1 && python -m pip show transformer-engine >/dev/null 2>&1; then
  python -m pip uninstall -y -q transformer-engine transformer_engine_cu13 || true
fi
# Megatron-Core imports triton unguarded; on CPU our compatibility layer must come first.
python -W ignore -c "from dsv4_train.mcore import cpu_compat; cpu_compat.apply(); import megatron.core, torch; print(f'dsv4-train ready: torch {torch.__version__}, megatron-core OK')"
