"""The real Slurm template and torchrun.sh, end to end, on CPU with gloo.

The stand-in `sbatch`/`srun`/`scontrol`/`scancel` (tests/launch/fake_slurm) run the payload locally
with the environment a cluster sets: 2 "nodes" are 2 local process groups of one task each. Every
run trains the tiny model for a few steps, so this file takes a few minutes on 2 cores.

Resumed-vs-uninterrupted comparisons use rel=1e-6: the same 2-rank layout, seed, data position,
optimizer and RNG state are restored exactly, so any larger difference is a resume bug (fp32 runs of
the same layout are otherwise bit-reproducible on CPU).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from dsv4_train.launch.preemption import EXIT_PREEMPTED
from tests.helpers import REPO, by_step, read_metrics
from tests.launch.launch_helpers import (
    SUBMIT,
    TORCHRUN,
    calls,
    describe,
    jobs,
    kill_tree,
    metrics_steps,
    run_script,
    slurm_env,
    wait_for,
)

MAX_STEPS = 8
TRAIN = [
    f"train.max_steps={MAX_STEPS}",
    "optim.warmup_steps=2",
    "optim.decay_steps=20",  # explicit, so the LR curve does not depend on where a run stops
    "logging.wandb=false",
]
COMPARED = ("lm_loss", "mtp_loss", "grad_norm", "lr")
SLURM_2x1 = {"RECIPE": "tiny_pretrain", "NODES": "2", "GPUS_PER_NODE": "1"}


def _submit_env(state: Path, run_dir: Path) -> dict:
    return slurm_env(state, {**SLURM_2x1, "RUN_DIR": str(run_dir)})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-node x 1-process run through launch/slurm/submit.sh."""
    root = tmp_path_factory.mktemp("reference")
    state, run_dir = root / "slurm", root / "run"
    proc = run_script(SUBMIT, TRAIN, _submit_env(state, run_dir))
    return proc, state, run_dir


def job_logs_text(logs_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(logs_dir.rglob("*")) if p.is_file())


def landed_step(text: str) -> int:
    """The earliest step during which a rank received the stop signal (each receiving rank logs it).

    The save is at that step or the next (when the signal lands after that step's agreement): the
    bound is timed by the ranks, not by the test, which on a loaded machine may send the signal several
    tiny steps after it read metrics.jsonl (seen in CI: 4 steps).
    """
    steps = [int(part.split(":")[0]) for part in text.split(" during step ")[1:]]
    assert steps, f"no rank logged receiving the signal:\n{text[-3000:]}"
    return min(steps)


def _assert_matches_reference(run_dir: Path, reference_dir: Path, steps) -> None:
    ref, got = by_step(read_metrics(reference_dir)), by_step(read_metrics(run_dir))
    for step in steps:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-6), (step, key, ref[step], got[step])


@pytest.mark.slow
def test_slurm_template_runs_two_nodes(reference):
    proc, state, run_dir = reference
    assert proc.returncode == 0, describe(proc)
    (sbatch,) = calls(state, "sbatch")
    assert {"--nodes=2", "--ntasks-per-node=1", "--signal=USR2@120"} <= set(sbatch["argv"])
    (job,) = jobs(state)
    assert job["attempts"] == [{"restart": 0, "rc": 0}], job
    (srun,) = calls(state, "srun")
    assert "--kill-on-bad-exit=1" in srun["argv"]
    (step,) = job["steps"].values()
    assert len(step["pgids"]) == 2 and step["rcs"] == [0, 0], "two nodes, one process group each"
    assert metrics_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    logs = run_dir / "logs" / f"slurm-{job['id']}"
    rank0 = (logs / "rank_0.out").read_text()
    assert "2 process(es)" in rank0, rank0[-2000:]
    assert (logs / "rank_1.out").is_file() and (run_dir / "logs" / "rank_1.log").is_file(), "per-rank logs"
    record = run_dir / "launch" / f"job-{job['id']}.attempt-0"
    assert "commit:" in (record / "code_version.txt").read_text() or "not a git checkout" in (
        record / "code_version.txt").read_text()
    assert f"dir: {run_dir}" in (record / "config.yaml").read_text()
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "launch" / "resubmit.sh").is_file()


@pytest.mark.slow
def test_slurm_preemption_saves_requeues_and_resumes(reference, tmp_path):
    ref_proc, _, ref_dir = reference
    assert ref_proc.returncode == 0, describe(ref_proc)
    state, run_dir = tmp_path / "slurm", tmp_path / "run"
    proc = subprocess.Popen(["bash", str(SUBMIT), *TRAIN], cwd=REPO, env=_submit_env(state, run_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics_steps(run_dir)) >= 2, timeout=240, what="step 2", proc=proc)
        last_before = max(metrics_steps(run_dir))
        (job,) = jobs(state)
        # What Slurm does SIGNAL_LEAD_S before the time limit: SIGUSR2 to every task of the step.
        subprocess.run(["scancel", "--signal=USR2", job["id"]], env=_submit_env(state, run_dir), check=True)
        proc.communicate(timeout=400)
    finally:
        kill_tree(proc.pid)  # no-op when it has exited
    assert proc.returncode == 0, describe(proc)
    (job,) = jobs(state)
    assert [a["rc"] for a in job["attempts"]] == [EXIT_PREEMPTED, 0], job
    first_step = job["steps"]["0"]
    assert first_step["rcs"] == [EXIT_PREEMPTED, EXIT_PREEMPTED], "every rank saved and exited with 75"
    assert [c["argv"] for c in calls(state, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", job["id"]]]
    rank0 = (run_dir / "logs" / f"slurm-{job['id']}" / "rank_0.out").read_text()
    saved = int(rank0.split("preemption requested: saving at step ")[1].split()[0])
    landed = landed_step(job_logs_text(run_dir / "logs"))
    assert last_before <= landed <= saved <= landed + 1, (last_before, landed, saved)
    assert "resumed from" in rank0
    assert metrics_steps(run_dir) == list(range(1, MAX_STEPS + 1)), "the requeued attempt appends the rest"
    _assert_matches_reference(run_dir, ref_dir, range(saved + 1, MAX_STEPS + 1))


@pytest.mark.slow
def test_torchrun_stop_signal_exits_75_and_the_same_command_resumes(reference, tmp_path):
    ref_proc, _, ref_dir = reference
    assert ref_proc.returncode == 0, describe(ref_proc)
    run_dir = tmp_path / "run"
    env = slurm_env(tmp_path / "nostate", {"NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir)})
    command = ["bash", str(TORCHRUN), *TRAIN]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics_steps(run_dir)) >= 2, timeout=240, what="step 2", proc=proc)
        last_before = max(metrics_steps(run_dir))
        proc.send_signal(signal.SIGTERM)  # to the launcher script only, as `kill <pid>` would
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)  # no-op when it has exited
    assert proc.returncode == EXIT_PREEMPTED, describe(proc)
    saved = max(metrics_steps(run_dir))
    landed = landed_step(out + err + job_logs_text(run_dir / "logs"))
    assert last_before <= landed <= saved <= landed + 1, (last_before, landed, saved)
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"{saved:08d}")
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, describe(again)
    assert metrics_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    _assert_matches_reference(run_dir, ref_dir, range(saved + 1, MAX_STEPS + 1))


@pytest.mark.slow
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    """SIGKILL every process while a checkpoint is being written (its .partial directory exists);
    the relaunch resumes from the newest complete checkpoint and finishes."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    env = slurm_env(tmp_path / "nostate", {"NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir)})
    command = ["bash", str(TORCHRUN), *TRAIN, "checkpoint.save_interval=1", "checkpoint.keep_last=10"]
    partial = []
    for _attempt in range(5):  # a save can finish between seeing .partial and the kill: try again
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # `latest` (not a marker file, which is written inside the .partial directory before
            # its rename) shows that one save has finished
            wait_for(lambda: (ckpt / "latest").is_file()
                     and any(p.name.endswith(".partial") for p in ckpt.glob("step_*")),
                     timeout=240, what="a save in progress after a complete one", proc=proc)
        finally:
            kill_tree(proc.pid)  # SIGKILL to the script, torchrun and every worker at once
        partial = sorted(p.name for p in ckpt.glob("step_*.partial"))
        if partial:
            break
    assert partial, "never caught a save in progress"
    latest = (ckpt / "latest").read_text().strip()
    assert (ckpt / latest / "dsv4_complete.json").is_file()
    assert int(latest.split("_")[1]) < int(partial[-1].split("_")[1].split(".")[0]), (latest, partial)
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, describe(again)
    resumed = [line for line in (run_dir / "logs" / "rank_0.log").read_text().splitlines() if "resumed from" in line]
    assert resumed and latest in resumed[-1], resumed
    assert max(metrics_steps(run_dir)) == MAX_STEPS


@pytest.mark.slow
def test_torchrun_script_reports_the_ranks_documented_exit_code(tmp_path):
    """torchrun reports any failed worker as 1; launch/torchrun.sh returns the code the ranks chose
    (here 3, a diverged run: docs/launching.md) instead."""
    from dsv4_train.train.nonfinite import EXIT_NONFINITE

    run_dir = tmp_path / "run"
    env = slurm_env(tmp_path / "nostate", {"NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir)})
    diverging = ["train.max_steps=8", "optim.warmup_steps=1", "optim.lr=1e4", "optim.min_lr=0",
                 "train.max_skipped_steps=1", "checkpoint.save_final=false", "logging.wandb=false"]
    proc = subprocess.run(["bash", str(TORCHRUN), *diverging], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == EXIT_NONFINITE, describe(proc)
    assert f"torchrun.sh: the ranks exited with {EXIT_NONFINITE}" in proc.stderr
    assert not list((run_dir / "logs").glob("exit_code.torchrun.*"))  # the script cleans up after itself
