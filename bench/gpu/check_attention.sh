#!/usr/bin/env bash
# The attention kernel check on the GPU machine (see bench/gpu/env.sh); results in $OUT (or ./gpu/out).
source "$(dirname "$0")/env.sh"
python bench/gpu/check_attention.py --out "$out/attention_check.jsonl" "$@"
