"""Hydra sweeps: local multirun gives each job its own run.dir; the Slurm launcher config composes
without Slurm, is checked before submitting, and a sweep's jobs share one wandb group."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from dsv4_train.config.load import CONFIG_DIR
from dsv4_train.launch import slurm_sweep
from dsv4_train.launch.sweep import sweep_group, wandb_group
from tests.helpers import REPO, read_metrics
from tests.launch.launch_helpers import calls, describe, slurm_env


def _cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "dsv4_train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_local_multirun_gives_each_job_its_own_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "conf=tiny_pretrain", "optim.lr=1e-3,3e-3", "train.max_steps=2", "optim.warmup_steps=1",
            "optim.decay_steps=100",
            "logging.wandb=false", f"hydra.sweep.dir={sweep}"]
    proc = _cli(args, slurm_env(tmp_path / "state"))
    assert proc.returncode == 0, describe(proc)
    lrs = {}
    for job in ("0", "1"):
        rows = read_metrics(sweep / job)
        assert [r["step"] for r in rows] == [1, 2]
        assert (sweep / job / "config.yaml").is_file()
        lrs[job] = rows[-1]["lr"]
    # Each job ran with its own LR: step 2 is 1/100 into a cosine decay, so the LRs keep a ratio of
    # 3 to within 1e-2 (the shared min_lr shifts it by < 1e-3).
    assert lrs["1"] == pytest.approx(3 * lrs["0"], rel=1e-2), lrs


@pytest.mark.slow
def test_slurm_sweep_through_submitit_runs_each_point_on_two_nodes(tmp_path):
    """hydra/launcher=dsv4_slurm end to end: submitit writes a job array, the stand-in sbatch runs it
    (2 nodes x 1 task per point), each task finds its rank from SLURM_* (no torchrun)."""
    if not slurm_sweep.HAVE_SUBMITIT:
        pytest.skip("hydra-submitit-launcher (optional extra) not installed")
    sweep = tmp_path / "sweep"
    env = slurm_env(tmp_path / "state", {"FAKE_SLURM_BACKGROUND": "1"})
    proc = _cli(["-m", "hydra/launcher=dsv4_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
                 "hydra.launcher.gpus_per_node=1", "conf=tiny_pretrain", "optim.lr=1e-3,3e-3", "train.max_steps=2",
                 "optim.warmup_steps=1", "logging.wandb=false", f"hydra.sweep.dir={sweep}"], env)
    assert proc.returncode == 0, describe(proc)
    (sbatch,) = calls(tmp_path / "state", "sbatch")
    script = open(sbatch["argv"][-1]).read()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=USR2@120" in script
    for job in ("0", "1"):
        assert [r["step"] for r in read_metrics(sweep / job)] == [1, 2]
        (rank0_log,) = (sweep / ".submitit").glob(f"*_{job}/*_{job}_0_log.out")
        assert "training tiny on 2 process(es)" in rank0_log.read_text()


def test_slurm_launcher_composes_without_slurm(tmp_path):
    env = slurm_env(tmp_path)
    env["PATH"] = env["PATH"].split(":", 1)[1]  # no sbatch/srun anywhere
    for what in ("job", "hydra"):
        proc = _cli(["hydra/launcher=dsv4_slurm", "conf=tiny_pretrain", "--cfg", what], env, timeout=120)
        assert proc.returncode == 0, describe(proc)
    assert "hydra_plugins.dsv4_slurm_launcher.CheckedSlurmLauncher" in proc.stdout
    assert "signal_delay_s: 120" in proc.stdout


def test_unknown_launcher_fails_before_submitting(tmp_path):
    proc = _cli(["-m", "hydra/launcher=dsv4_slurmm", "conf=tiny_pretrain", "optim.lr=1e-3,3e-3",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], slurm_env(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "dsv4_slurmm" in proc.stderr and "dsv4_slurm" in proc.stderr.replace("dsv4_slurmm", ""), proc.stderr
    assert calls(tmp_path, "sbatch") == [] and not (tmp_path / "sweep").exists()


def test_slurm_sweep_that_does_not_fit_is_not_submitted(tmp_path):
    # 1 node x 3 GPUs = DP3 cannot split tiny_pretrain's batch of 8 (micro-batch 4): every sweep point
    # is rejected on the submitting machine before sbatch is called.
    proc = _cli(["-m", "hydra/launcher=dsv4_slurm", "conf=tiny_pretrain", "optim.lr=1e-3,3e-3",
                 "hydra.launcher.tasks_per_node=3", "hydra.launcher.gpus_per_node=3",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], slurm_env(tmp_path), timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    assert "does not fit hydra.launcher.nodes=1 x hydra.launcher.tasks_per_node=3" in proc.stderr, proc.stderr
    assert "train.global_batch_size=8 is not divisible by train.micro_batch_size * dp = 4*3" in proc.stderr
    assert calls(tmp_path, "sbatch") == []


def test_launcher_without_the_optional_extra_names_it(monkeypatch):
    monkeypatch.setattr(slurm_sweep, "HAVE_SUBMITIT", False)
    with pytest.raises(ValueError, match=r"pip install 'dsv4-train\[slurm\]'"):
        slurm_sweep.CheckedSlurmLauncherBase(nodes=1, tasks_per_node=8, gpus_per_node=8)


def test_launcher_wants_one_task_per_gpu():
    if not slurm_sweep.HAVE_SUBMITIT:
        pytest.skip("hydra-submitit-launcher (optional extra) not installed")
    with pytest.raises(ValueError, match="one task per GPU"):
        slurm_sweep.CheckedSlurmLauncherBase(nodes=1, tasks_per_node=1, gpus_per_node=8)


@pytest.fixture
def hydra_config():
    """Install a composed Hydra config as the current job's, as Hydra does inside a job."""

    def install(mode: RunMode, sweep_dir: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name="config", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
            cfg.hydra.sweep.dir = sweep_dir
        HydraConfig.instance().set_config(cfg)

    yield install
    HydraConfig.instance().cfg = None


def test_sweep_jobs_share_a_wandb_group(hydra_config):
    hydra_config(RunMode.MULTIRUN, "multirun/tiny_pretrain/2025-01-02_03-04-05")
    assert sweep_group() == "tiny_pretrain/2025-01-02_03-04-05"
    assert wandb_group(None) == "tiny_pretrain/2025-01-02_03-04-05"
    assert wandb_group("mine") == "mine", "an explicit logging.wandb_group wins"


def test_single_run_has_no_sweep_group(hydra_config):
    hydra_config(RunMode.RUN, "multirun/x/y")
    assert sweep_group() is None and wandb_group(None) is None
