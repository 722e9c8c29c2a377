"""Launch scripts: shellcheck-clean, and bad launches fail before submitting with one clear message."""

import re
import shutil
import subprocess

import pytest

from tests.launch.launch_helpers import SUBMIT, TEMPLATES, TORCHRUN, calls, describe, run_script, slurm_env

GOOD_SUBMIT = {"RECIPE": "tiny_pretrain", "NODES": "2", "GPUS_PER_NODE": "1"}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", TEMPLATES, ids=lambda p: p.name)
def test_templates_pass_shellcheck(script):
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("missing", ["RECIPE", "NODES", "GPUS_PER_NODE", "RUN_DIR"])
def test_submit_names_a_missing_variable(tmp_path, missing):
    env = slurm_env(tmp_path, {**GOOD_SUBMIT, "RUN_DIR": str(tmp_path / "run")})
    env.pop(missing)
    proc = run_script(SUBMIT, [], env)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "one message"
    assert proc.stderr.startswith(f"submit.sh: error: {missing} is not set:"), proc.stderr
    assert calls(tmp_path, "sbatch") == []


def test_submit_rejects_a_non_numeric_size(tmp_path):
    env = slurm_env(tmp_path, {**GOOD_SUBMIT, "NODES": "two", "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(SUBMIT, [], env)
    assert proc.returncode == 2 and "NODES=two is not a positive integer" in proc.stderr, describe(proc)
    assert calls(tmp_path, "sbatch") == []


def test_submit_rejects_nodes_times_gpus_that_do_not_fit_the_config(tmp_path):
    # flash_pretrain is laid out for a fixed GPU count (parallel.world_size); 2 x 4 = 8 cannot run it.
    env = slurm_env(tmp_path, {"RECIPE": "flash_pretrain", "NODES": "2", "GPUS_PER_NODE": "4",
                               "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(SUBMIT, [], env)
    assert proc.returncode == 2, describe(proc)
    assert "2 node(s) x 4 process(es) per node = 8 processes" in proc.stderr
    assert re.search(r"parallel.world_size=\d+ but the job was launched with 8 processes", proc.stderr)
    assert calls(tmp_path, "sbatch") == [] and not (tmp_path / "run").exists()


def test_submit_rejects_a_layout_that_does_not_divide(tmp_path):
    env = slurm_env(tmp_path, {**GOOD_SUBMIT, "NODES": "3", "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(SUBMIT, ["parallel.tp=2"], env)
    assert proc.returncode == 2, describe(proc)
    assert "world size 3 is not divisible by parallel.tp * parallel.pp * parallel.cp" in proc.stderr
    assert calls(tmp_path, "sbatch") == []


def test_submit_rejects_an_unknown_recipe(tmp_path):
    env = slurm_env(tmp_path, {**GOOD_SUBMIT, "RECIPE": "tiny_pretrian", "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(SUBMIT, [], env)
    assert proc.returncode == 2 and "tiny_pretrian" in proc.stderr, describe(proc)
    assert calls(tmp_path, "sbatch") == []


def test_submit_without_sbatch_says_where_to_run(tmp_path):
    env = slurm_env(tmp_path, {**GOOD_SUBMIT, "RUN_DIR": str(tmp_path / "run")})
    env["PATH"] = env["PATH"].split(":", 1)[1]  # drop the stand-in tools
    proc = run_script(SUBMIT, [], env)
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr, describe(proc)


@pytest.mark.parametrize("missing", ["NPROC_PER_NODE", "RUN_DIR"])
def test_torchrun_names_a_missing_variable(tmp_path, missing):
    env = slurm_env(tmp_path, {"NPROC_PER_NODE": "2", "RUN_DIR": str(tmp_path / "run")})
    env.pop(missing)
    proc = run_script(TORCHRUN, [], env)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.startswith(f"torchrun.sh: error: {missing} is not set:"), proc.stderr


def test_torchrun_checks_the_world_size_before_starting(tmp_path):
    env = slurm_env(tmp_path, {"NPROC_PER_NODE": "3", "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(TORCHRUN, ["parallel.pp=2"], env)
    assert proc.returncode == 2, describe(proc)
    assert "world size 3 is not divisible" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing started"


def test_multinode_torchrun_needs_a_rendezvous_endpoint(tmp_path):
    env = slurm_env(tmp_path, {"NPROC_PER_NODE": "1", "NNODES": "2", "RUN_DIR": str(tmp_path / "run")})
    proc = run_script(TORCHRUN, [], env)
    assert proc.returncode == 2 and "RDZV_ENDPOINT is not set" in proc.stderr, describe(proc)
