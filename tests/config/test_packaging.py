"""A built wheel is self-contained: its dsv4_train (not the source checkout) runs `conf=tiny_pretrain`
from an unrelated directory, with every config group and recipe inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO, read_metrics, run_cli


@pytest.mark.slow
def test_wheel_runs_recipes_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("dsv4_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ("tiny_pretrain", "flash_pretrain", "pro_pretrain", "flash_long_context", "pro_long_context"):
        assert f"dsv4_train/_conf/conf/{recipe}.yaml" in names
    assert "dsv4_train/_conf/config.yaml" in names and "dsv4_train/_conf/model/flash.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import dsv4_train.config.load as l; print(l.__file__, l.CONFIG_DIR)"],
                           cwd=elsewhere, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert str(site) in probe.stdout and "_conf" in probe.stdout, probe.stdout + probe.stderr
    result = run_cli(["conf=tiny_pretrain", "train.max_steps=2", "optim.warmup_steps=1", f"run.dir={elsewhere / 'run'}"],
                     cwd=elsewhere, env={"PYTHONPATH": str(site)}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(read_metrics(elsewhere / "run")) == 2
