"""`checkpoint.keep_last` pruning (checkpoint/io.py::_prune, train/checkpointer.py) never deletes the
checkpoint just written nor the one the run resumed from.

A 4-step run saves a real checkpoint at every step. Unit cases prune copies of its checkpoint root
directly; the CLI case damages the newest checkpoint, resumes (falling back to step 3, see
tests/checkpoint/test_verify.py) with `keep_last=1`, and checks that the checkpoint it resumed from
is still on disk and verifies after the run has saved two newer ones.
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_cli

RUN = ["optim.warmup_steps=1", "checkpoint.save_interval=1", "checkpoint.keep_last=10"]


def _steps(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    result = run_cli(["train.max_steps=4", *RUN, f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert _steps(root) == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    return run_dir


@pytest.fixture()
def root(trained, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", copy)
    return copy


@pytest.mark.slow
def test_keep_last_keeps_the_newest_and_the_protected(root):
    from dsv4_train.checkpoint.io import _prune

    removed = _prune(str(root), keep_last=1, keep=(str(root / "step_00000004"), str(root / "step_00000002")))
    assert sorted(removed) == [str(root / "step_00000001"), str(root / "step_00000003")]
    assert _steps(root) == ["step_00000002", "step_00000004"]


@pytest.mark.slow
def test_protection_ignores_path_spelling_and_outside_paths(root, tmp_path):
    """A protected path given with `..` or through a symlink is still the same checkpoint; a protected
    checkpoint outside the root (checkpoint.load=<dir> of another run) and None change nothing."""
    from dsv4_train.checkpoint.io import _prune

    link = tmp_path / "link"
    link.symlink_to(root)
    spelled = f"{root}/../{root.name}/step_00000001"
    _prune(str(root), keep_last=2, keep=(str(link / "step_00000004"), spelled, str(tmp_path / "elsewhere"), None))
    assert _steps(root) == ["step_00000001", "step_00000003", "step_00000004"]


@pytest.mark.slow
def test_partials_go_except_protected_ones(root):
    """Leftover `.partial` saves (a crash mid-save) are removed; keep_last<=0 keeps every complete one."""
    from dsv4_train.checkpoint.io import _prune

    (root / "step_00000005.partial").mkdir()
    (root / "step_00000006.partial").mkdir()
    _prune(str(root), keep_last=0, keep=(str(root / "step_00000006"),))
    assert _steps(root) == [f"step_0000000{s}" for s in (1, 2, 3, 4)] + ["step_00000006.partial"]


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_fallback_resume_keeps_its_checkpoint_through_pruning(trained, tmp_path):
    """Step 4 damaged: the run falls back to step 3, trains to 6 saving at 4 (again) and 6 with
    keep_last=1. Before protection, saving step 4 deleted steps 1-3, the one it resumed from."""
    from dsv4_train.checkpoint.io import checkpoint_problems

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    root = run_dir / "checkpoints"
    _flip(root / "step_00000004" / "__0_0.distcp")
    result = run_cli(["train.max_steps=6", "optim.warmup_steps=1", "checkpoint.save_interval=2",
                      "checkpoint.keep_last=1", f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {root / 'step_00000003'} at step 3" in result.stdout, result.stdout[-3000:]
    assert _steps(root) == ["step_00000003", "step_00000006"]
    for step in ("step_00000003", "step_00000006"):
        assert checkpoint_problems(str(root / step), "full") == [], step


@pytest.mark.slow
def test_disk_space_estimate_covers_a_real_checkpoint(trained):
    """The pre-start free-space check (launch/output_dirs.py::checkpoint_bytes) asks for at least
    what a checkpoint of this run takes on disk, and not wildly more (<= 1.5x: a refusal of a run
    that would fit is a false alarm)."""
    from dsv4_train.config.load import compose
    from dsv4_train.launch.output_dirs import checkpoint_bytes

    step = trained / "checkpoints" / "step_00000004"
    on_disk = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    estimate = checkpoint_bytes(compose(RUN))
    assert on_disk <= estimate <= 1.5 * on_disk, (on_disk, estimate)
