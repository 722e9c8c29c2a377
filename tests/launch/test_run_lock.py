"""One run per run directory (launch/run_lock.py), through the real CLI.

While a run trains, a second launch into the same run.dir (or into another run.dir sharing its
checkpoint.dir) exits with status 2 before importing torch or writing anything, naming the holder's pid; the first run
finishes unharmed (every step logged once, final checkpoint written); once it has exited, the
directory is free again (the lock dies with its process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, by_step, cli_env, read_metrics, run_cli

STEPS = 40


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_second_launch_is_refused_while_the_first_trains(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "shared_ckpt"
    args = [f"train.max_steps={STEPS}", "optim.warmup_steps=1", f"checkpoint.dir={ckpt}"]
    first = subprocess.Popen([sys.executable, "-m", "dsv4_train", *args, f"run.dir={run_dir}"], cwd=REPO,
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300), "the first run never started"
        config_before = (run_dir / "config.yaml").read_text()
        started = time.monotonic()
        # PYTHONPROFILEIMPORTTIME lists every module the refused launch imported (on stderr).
        second = run_cli([*args, f"run.dir={run_dir}", "optim.lr=2e-3"], timeout=120,
                         env={"PYTHONPROFILEIMPORTTIME": "1"})
        refused_after = time.monotonic() - started
        other_dir = run_cli([*args, f"run.dir={tmp_path / 'other'}"], timeout=120)
        assert first.poll() is None, "the first run ended before the second launch was tried"
    finally:
        out, err = first.communicate(timeout=600)
    holder = json.loads((run_dir / ".dsv4.lock").read_text())
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"run.dir={run_dir} is in use by another run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and holder["pid"] == first.pid
    print(f"second launch refused after {refused_after:.1f} s")
    # The lock is checked right after the config is validated, before torch and Megatron-Core start
    # up (cli.py): shown load-independently by the imports, as a wall-clock bound cannot be on a shared
    # CI machine (0.4 s idle here, 9 s with five other test processes on 2 cores).
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert "dsv4_train.config.load" in imported, "PYTHONPROFILEIMPORTTIME listed no imports"
    assert not {"torch", "megatron.core"} & imported, "the refused launch imported torch or Megatron-Core"
    assert refused_after < 30, f"the second launch took {refused_after:.1f} s to be refused"
    assert other_dir.returncode == 2 and f"checkpoint.dir={ckpt} is in use by another run" in other_dir.stderr
    assert not (tmp_path / "other" / "config.yaml").exists()
    # The first run is unharmed: its config untouched, every step once, its final checkpoint saved.
    assert first.returncode == 0, err[-3000:]
    assert (run_dir / "config.yaml").read_text() == config_before
    assert sorted(by_step(read_metrics(run_dir))) == list(range(1, STEPS + 1))
    assert len(read_metrics(run_dir)) == STEPS
    assert (ckpt / f"step_{STEPS:08d}").is_dir()
    # Free again once the holder has exited.
    again = run_cli([f"train.max_steps={STEPS + 1}", "optim.warmup_steps=1", f"checkpoint.dir={ckpt}",
                     f"run.dir={run_dir}"], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_kill_9_of_the_torchrun_agent_stops_every_worker(tmp_path):
    """Workers ask the kernel to die with their launcher (runtime/distributed.py::die_with_launcher)."""
    import os
    import signal

    import psutil

    run_dir = tmp_path / "run"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "dsv4_train", "train.max_steps=500", "optim.warmup_steps=1", f"run.dir={run_dir}"],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300), "the run never started"
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "dsv4_train" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        killed_at = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        print(f"workers gone {time.monotonic() - killed_at:.1f} s after kill -9 of the agent")
        assert not alive, [p.pid for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


@pytest.mark.slow
def test_kill_9_of_a_saving_run_leaves_no_process_behind(tmp_path):
    """Megatron's checkpoint writer starts a multiprocessing manager; it dies with the trainer
    (checkpoint/writer_queue.py)."""
    import os
    import signal

    import psutil

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsv4_train", "train.max_steps=500", "optim.warmup_steps=1",
                             "checkpoint.save_interval=1", f"run.dir={run_dir}"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: any((run_dir / "checkpoints").glob("step_*/dsv4_complete.json")), 300), "no checkpoint"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "expected the writer's manager process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
