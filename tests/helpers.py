"""Run the real CLI as users do: subprocesses, one process or torchrun with N processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def cli_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TORCHDYNAMO_DISABLE": "1",
            "WANDB_MODE": "disabled",
            "PYTHONWARNINGS": "ignore",
            "HYDRA_FULL_ERROR": "0",
        }
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], *, nproc: int = 1, timeout: int = 600, env: Optional[dict] = None, cwd=None,
            module: str = "dsv4_train"):
    if nproc == 1:
        cmd: List[str] = [sys.executable, "-m", module, *args]
    else:
        cmd = [
            # --standalone: torchrun binds its store on a free port itself (a port picked here could be
            # taken by another test's connection before torchrun binds it: EADDRINUSE under pytest -n 2).
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", "-m", module, *args,
        ]
    return subprocess.run(cmd, cwd=cwd or REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(rows: List[dict]) -> dict:
    return {row["step"]: row for row in rows}
