"""The real entry point (`python -m dsv4_train`) as subprocesses: --cfg job, one run.dir per run and per
multirun job, and bad inputs reported as one message with exit status 2 and no traceback.

The runs use `run.plan_only=true`: the real entry composes, validates and writes `plan.json` (with the
run's batch settings) into its run.dir without training, so these tests exercise configuration.
"""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env


@pytest.fixture()
def entry(tmp_path):
    def run(*args):
        env = cli_env()
        fixed = ["run.plan_only=true", f"hydra.run.dir={tmp_path}/runs/tiny_pretrain/now",
                 f"hydra.sweep.dir={tmp_path}/multirun/now"]
        flags = [a for a in args if a == "-m"]  # argparse wants the flag before the overrides
        rest = [a for a in args if a != "-m"]
        proc = subprocess.run([sys.executable, "-m", "dsv4_train", *flags, *fixed, *rest],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        jobs = []
        for path in sorted(tmp_path.rglob("plan.json")):
            plan = json.loads(path.read_text())
            jobs.append({"run_dir": str(path.parent), "max_steps": plan["schedule"]["decay_end_step"],
                         "model": plan["model"]})
        return proc, jobs

    return run


def test_cfg_job_prints_the_config(entry):
    proc, jobs = entry("conf=flash_pretrain", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: flash" in proc.stdout and "compress_ratios" in proc.stdout and not jobs


def test_run_writes_into_its_hydra_output_dir(entry, tmp_path):
    proc, jobs = entry("train.max_steps=30")
    assert proc.returncode == 0, proc.stderr
    (job,) = jobs
    assert job["max_steps"] == 30 and job["run_dir"].startswith(str(tmp_path / "runs" / "tiny_pretrain"))


def test_multirun_jobs_get_distinct_run_dirs(entry, tmp_path):
    proc, jobs = entry("-m", "train.max_steps=21,22")
    assert proc.returncode == 0, proc.stderr
    assert sorted(j["max_steps"] for j in jobs) == [21, 22]
    dirs = {j["run_dir"] for j in jobs}
    assert len(dirs) == 2 and all(d.startswith(str(tmp_path / "multirun")) for d in dirs)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.hidden_sise=8"], "model.hidden_sise"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["conf=nope"], "conf=nope"),
        (["parallel=nope"], "parallel=nope"),
        (["-m", "train.precision=fp32,fp16"], "train.precision='fp16'"),  # invalid sweep value
        (["parallel.tp=3"], "parallel.tp=3"),  # validate(): caught before Hydra runs
        (["optim.lr=1e-3,2e-3"], "'optim.lr=1e-3,2e-3' gives several values: add -m"),  # a sweep without -m
        (["optim.lr=range(1,3)"], "'optim.lr=range(1,3)' gives several values: add -m"),
    ],
)
def test_bad_input_is_one_message_exit_2(entry, args, needle):
    proc, jobs = entry(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
    assert not jobs
