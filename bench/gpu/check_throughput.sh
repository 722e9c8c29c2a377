#!/usr/bin/env bash
# On the lent GPU machine (Python 3.12, torch with CUDA, no network): install the carried wheels
# (megatron-core, Hydra, OmegaConf from ../shared/gpu-wheels: copy them into gpu/wheels/, an ignored
# folder, and carry it), then run the throughput check; results land in $OUT (or ./gpu/out).
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install -q --no-index --no-deps --target "$HOME/.dsv4-site" gpu/wheels/*.whl
export PYTHONPATH="$HOME/.dsv4-site:$PWD"
out="${OUT:-gpu/out}"
mkdir -p "$out"
python bench/gpu/check_throughput.py --out "$out/throughput_check.jsonl" "$@"
