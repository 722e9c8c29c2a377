"""Discover this process's place in the job: torchrun, srun without torchrun, or a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A plain `srun` task (as
submitit runs jobs) sets only SLURM_* variables: rank = SLURM_PROCID, world = SLURM_NTASKS, and the
rendezvous host is the first node of SLURM_JOB_NODELIST (expanded with `scontrol show hostnames`).
Anything else is a single process on a free local port.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    raise ValueError(
        f"cannot find the first host of SLURM_JOB_NODELIST={nodelist!r}: `scontrol` is unavailable; "
        "set MASTER_ADDR explicitly."
    )


def discover() -> ProcessEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return ProcessEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return ProcessEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
