"""Rank discovery under torchrun, under srun without torchrun (as submitit runs jobs), and alone."""

import os

import pytest

from dsv4_train.launch.env import discover, expand_hostlist
from tests.launch.launch_helpers import FAKE_BIN


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun inside a Slurm job: torchrun decides
    assert discover(env) == discover(env).__class__(3, 4, 1, "h0", 1234, "torchrun")


def test_srun_task_without_torchrun(monkeypatch, tmp_path):
    # The first host comes from the stand-in `scontrol show hostnames`, as on a cluster.
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_STEP_NODELIST": "gpu[008-011]"}
    process = discover(env)
    assert (process.rank, process.world_size, process.local_rank, process.source) == (5, 8, 1, "slurm")
    assert process.master_addr == "gpu008", "the step's first node, zero padding kept"
    assert process.master_port == discover(env).master_port == 20000 + 4242 % 20000


def test_srun_master_addr_override_and_plain_nodelist():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a,b"}
    assert discover(env).master_addr == "a"
    assert discover({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "999"}).master_port == 999


def test_single_process_and_one_task_job():
    assert discover({}).source == "single"
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}).source == "single"


def test_bracketed_nodelist_without_scontrol_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        expand_hostlist("node[1-2]")


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "rank 2 is outside world size 2"),
    ],
)
def test_inconsistent_launcher_variables(env, match):
    with pytest.raises(ValueError, match=match):
        discover(env)
