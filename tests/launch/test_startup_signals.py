"""A stop signal during start-up (after the run directory exists, before the first step) ends the
run with the documented preemption code and a message, writes no checkpoint, and the same command
then trains normally."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from dsv4_train.launch.preemption import EXIT_PREEMPTED
from tests.helpers import REPO, cli_env, run_cli


@pytest.mark.slow
def test_sigterm_during_start_up(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.max_steps=3", "optim.warmup_steps=1", f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4_train", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "logs" / "rank_0.log"
    deadline = time.monotonic() + 120
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the model, data and optimizer are still being built
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:] + err[-2000:]
    assert "stop signal during start-up: exiting with 75 before the first step" in out
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("step_*"))
    again = run_cli(args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
