# Sourced by the bench/gpu/check_*.sh scripts. On the lent GPU machine (Python 3.12, torch with CUDA,
# no network): install the carried wheels (megatron-core, Hydra, OmegaConf: copy them into gpu/wheels/,
# an ignored folder, and carry it) and set `out` to where results land ($OUT, or ./gpu/out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
pip install -q --no-index --no-deps --target "$HOME/.dsv4-site" gpu/wheels/*.whl
export PYTHONPATH="$HOME/.dsv4-site:$PWD"
out="${OUT:-gpu/out}"
mkdir -p "$out"
