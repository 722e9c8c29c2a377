"""run.device decides placement, not what the host has: with CUDA reported available (faked by a
sitecustomize in the child process; this torch has no CUDA, so any CUDA use fails loudly),
run.device=cpu trains on the CPU end to end (model build, expert path, CPU compatibility layer,
checkpoint RNG state)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, read_metrics, run_cli


@pytest.mark.slow
def test_run_device_cpu_ignores_an_available_gpu(tmp_path):
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n")
    result = run_cli(["run.device=cpu", "train.max_steps=2", "optim.warmup_steps=1", f"run.dir={tmp_path / 'run'}"],
                     env={"PYTHONPATH": f"{fake}:{REPO}"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
