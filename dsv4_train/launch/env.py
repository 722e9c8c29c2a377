"""Discover this process's place in the job: torchrun, srun without torchrun, or a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A plain `srun` task (the
Slurm template and submitit both run one task per GPU) sets only SLURM_* variables: rank =
SLURM_PROCID, world = the step's task count, and the rendezvous host is the first node of the step
(expanded with `scontrol show hostnames`). Anything else is a single process on a free local port.

Run the entry point through `srun` inside a batch script: the batch shell itself also carries
SLURM_PROCID=0 and the job's SLURM_NTASKS, and a process started there directly would wait for
ranks that never come.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional


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


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (`node[01-03,7],gpu5`) with `scontrol show hostnames`.

    Falls back to a plain comma split when there is no bracket; raises ValueError when a bracketed
    list cannot be expanded because `scontrol` is unavailable.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    if "[" not in nodelist:
        return [host for host in nodelist.split(",") if host]
    raise ValueError(
        f"cannot expand the Slurm node list {nodelist!r}: `scontrol` is unavailable. Set MASTER_ADDR "
        "to the first node's host name (and MASTER_PORT) in the job script."
    )


def _int_var(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required here but not set.")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer.") from None


def _slurm_port(env: Mapping[str, str]) -> int:
    # Same job id -> same port on every task without any communication; the requeued job keeps its
    # id and reuses the port after the previous attempt has exited.
    return 20000 + _int_var(env, "SLURM_JOB_ID", 0) % 20000


def discover(env: Optional[Mapping[str, str]] = None) -> ProcessEnv:
    """Rank, world size and rendezvous address of this process (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        process = ProcessEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK", 0),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_var(env, "MASTER_PORT", 29500),
            source="torchrun",
        )
    elif "SLURM_PROCID" in env and _slurm_tasks(env) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        process = ProcessEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_slurm_tasks(env),
            local_rank=_int_var(env, "SLURM_LOCALID", 0),
            master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            master_port=_int_var(env, "MASTER_PORT", _slurm_port(env)),
            source="slurm",
        )
    else:
        return ProcessEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    if not 0 <= process.rank < process.world_size:
        raise ValueError(
            f"rank {process.rank} is outside world size {process.world_size} ({process.source} "
            "environment); the launcher's rank variables are inconsistent."
        )
    return process


def _slurm_tasks(env: Mapping[str, str]) -> int:
    # A step's own task count (set by srun) wins over the job's, which can be larger.
    if env.get("SLURM_STEP_NUM_TASKS"):
        return _int_var(env, "SLURM_STEP_NUM_TASKS")
    return _int_var(env, "SLURM_NTASKS", 1)
