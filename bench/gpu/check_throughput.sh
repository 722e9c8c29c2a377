#!/usr/bin/env bash
# The throughput check on the GPU machine (see bench/gpu/env.sh); results in $OUT (or ./gpu/out).
source "$(dirname "$0")/env.sh"
python bench/gpu/check_throughput.py --out "$out/throughput_check.jsonl" "$@"
