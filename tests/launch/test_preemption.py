"""The preemption protocol: the handler sets a flag, ranks agree at a step boundary, rank 0 requeues."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4_train.launch.preemption import EXIT_PREEMPTED, PreemptionWatcher
from tests.launch.launch_helpers import TORCHRUN, calls, describe, run_script, slurm_env, wait_for

WORKER = Path(__file__).resolve().parent / "preemption_worker.py"


@pytest.fixture
def watcher():
    w = PreemptionWatcher.install()
    yield w
    PreemptionWatcher.uninstall()


def test_exit_code_matches_the_launch_scripts_and_docs():
    """The Slurm template requeues on, torchrun.sh returns, and the docs document the code the
    trainer exits with: changing one without the others fails here."""
    root = Path(__file__).resolve().parents[2]
    sbatch = (root / "launch" / "slurm" / "pretrain.sbatch").read_text()
    torchrun = (root / "launch" / "torchrun.sh").read_text()
    docs = (root / "docs" / "launching.md").read_text()
    assert f"    {EXIT_PREEMPTED}) echo" in sbatch
    assert f"exit {EXIT_PREEMPTED}\n" in torchrun
    assert f"| {EXIT_PREEMPTED} | stopped on a signal after saving a checkpoint (`EXIT_PREEMPTED`)" in docs


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_signal_only_sets_the_flag(watcher, signum):
    assert not watcher.should_stop()
    os.kill(os.getpid(), signum)  # delivered before os.kill returns (same thread, main thread)
    assert watcher.received_signal == signum
    assert watcher.should_stop() and watcher.should_stop(), "the decision sticks once taken"


def test_install_twice_keeps_one_flag(watcher):
    os.kill(os.getpid(), signal.SIGUSR1)
    assert PreemptionWatcher.install() is watcher and watcher.should_stop()


def test_requeue_outside_slurm_does_nothing(watcher, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # would log a warning if it tried scontrol
    watcher.requeue_if_slurm()
    assert not caplog.records, caplog.text


@pytest.mark.parametrize("torchrun_status", [0, 1])
def test_torchrun_script_returns_75_from_the_ranks_whatever_torchrun_reports(tmp_path, torchrun_status):
    """After a stop signal torchrun may report 0 or 1; the 75 the ranks wrote to DSV4_EXIT_CODE_FILE
    is what the script returns (a stand-in torchrun plays the ranks here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/bin/sh\necho {EXIT_PREEMPTED} > "$DSV4_EXIT_CODE_FILE"\nexit {torchrun_status}\n')
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    env = slurm_env(tmp_path / "nostate", {"NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    proc = run_script(TORCHRUN, [], env)
    assert proc.returncode == EXIT_PREEMPTED, describe(proc)
    assert "torchrun.sh: checkpoint saved on a stop signal; run the same command to resume" in proc.stderr
    assert not list((run_dir / "logs").glob("exit_code.torchrun.*"))


def test_failed_requeue_is_logged_not_raised(watcher, tmp_path, monkeypatch, caplog):
    for key, value in slurm_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # unknown to the stand-in scontrol: it fails
    watcher.requeue_if_slurm()
    assert [c["argv"] for c in calls(tmp_path, "scontrol")] == [["requeue", "999"]]
    assert "resubmit the job by hand" in caplog.text


def test_requeue_can_be_switched_off(watcher, tmp_path, monkeypatch):
    for key, value in slurm_env(tmp_path, {"SLURM_JOB_ID": "5", "DSV4_REQUEUE": "0"}).items():
        monkeypatch.setenv(key, value)
    watcher.requeue_if_slurm()
    assert calls(tmp_path, "scontrol") == []


@pytest.mark.slow
def test_ranks_agree_and_rank0_requeues_once(tmp_path):
    """Two srun-style gloo ranks; only rank 1 gets SIGUSR2. Both stop after the same step, within
    one step of the signal, "save", and exactly one `scontrol requeue <job>` is issued."""
    job_id = "4711"
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / f"{job_id}.json").write_text("{}")  # the stand-in scontrol knows the job
    port = "29500"  # discover() reads it; the worker rendezvouses through a file (no port race)
    procs, logs = [], []
    for rank in range(2):
        env = slurm_env(tmp_path, {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                                    "SLURM_JOB_ID": job_id, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        log = open(tmp_path / f"rank{rank}.out", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        rank1_log = tmp_path / "rank1.out"
        wait_for(lambda: "step 3\n" in rank1_log.read_text(), timeout=60, what="step 3 on rank 1", proc=procs[1])
        last_step_before = max(int(line.split()[1]) for line in rank1_log.read_text().splitlines()
                               if line.startswith("step "))
        procs[1].send_signal(signal.SIGUSR2)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"rank{r}.out").read_text() for r in range(2)]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outputs
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert results[0]["stopped_at"] == results[1]["stopped_at"], results
    assert results[0]["received"] is None and results[1]["received"] == signal.SIGUSR2
    # The step in flight when the signal lands is finished, then they stop (the next step when it lands
    # after that step's agreement). Timed by the worker, not by this test: on a loaded machine several
    # 20 ms steps can pass between reading the log and sending the signal.
    landed = results[1]["received_during_step"]
    assert last_step_before <= landed <= results[1]["stopped_at"] <= landed + 1, (results, last_step_before)
    assert [c["argv"] for c in calls(tmp_path, "scontrol")] == [["requeue", job_id]]
    assert {(tmp_path / f"saved_rank{r}").read_text() for r in range(2)} == {str(results[0]["stopped_at"])}
