#!/bin/bash
# Argument checks shared by launch/torchrun.sh and launch/slurm/submit.sh: one clear message and
# exit 2 per problem. (launch/slurm/pretrain.sbatch keeps its own copy: Slurm runs a spooled copy
# of the batch script, from which a relative `source` would not resolve.)

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

require_var() {  # name, what it is and an example
    [[ -n "${!1:-}" ]] || die "$1 is not set: $2"
}

require_positive_int() {
    [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1=${!1} is not a positive integer: $2"
}
