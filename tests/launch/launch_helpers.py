"""Run the real launch scripts with the stand-in Slurm tools first on PATH (tests/launch/fake_slurm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from tests.helpers import REPO, cli_env

FAKE_BIN = Path(__file__).resolve().parent / "fake_slurm" / "bin"
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"
SBATCH_TEMPLATE = REPO / "launch" / "slurm" / "pretrain.sbatch"
TORCHRUN = REPO / "launch" / "torchrun.sh"
TEMPLATES = [SUBMIT, SBATCH_TEMPLATE, TORCHRUN, REPO / "launch" / "lib" / "checks.sh"]


def slurm_env(state_dir: Path, extra: Optional[dict] = None) -> dict:
    """The test environment plus the stand-in Slurm tools first on PATH and the venv's bin next."""
    env = cli_env()
    for var in [v for v in env if v.startswith("SLURM_")] + ["DSV4_EXIT_CODE_FILE"]:
        env.pop(var, None)
    env["PATH"] = os.pathsep.join([str(FAKE_BIN), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FAKE_SLURM_DIR"] = str(state_dir)
    env.update(extra or {})
    return env


def calls(state_dir: Path, tool: Optional[str] = None) -> List[dict]:
    path = Path(state_dir) / "calls.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if tool is None or r["tool"] == tool]


def jobs(state_dir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(state_dir) / "jobs").glob("*.json"))]


def run_script(script: Path, args: List[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def metrics_steps(run_dir: Path) -> List[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts workers in new sessions,
    so killing a process group is not enough), as a node crash would."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    tree = root.children(recursive=True) + [root]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def describe(proc) -> str:
    out = proc.stdout if isinstance(proc.stdout, str) else ""
    err = proc.stderr if isinstance(proc.stderr, str) else ""
    return f"exit {proc.returncode}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-4000:]}"
