"""What a resume continues, through the real CLI.

* metrics.jsonl is cut back to the checkpoint's step: after a crash past the last checkpoint, the
  rerun logs each step exactly once, and the re-trained steps equal the first attempt's (==).
* The LR schedule follows the current config: extending train.max_steps on resume says so and gives
  the LR of a run planned that long from the start (==: the same arithmetic).
* A checkpoint of a model with other shapes is refused before anything is written, naming the key.
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import by_step, read_metrics, run_cli

BASE = ["optim.warmup_steps=1", "optim.decay_style=cosine", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Steps 1-3 logged, the last checkpoint at step 2 (as if the process died during step 4)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    result = run_cli(["train.max_steps=3", *BASE, "checkpoint.save_interval=2", "checkpoint.save_final=false",
                      f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    return run_dir


@pytest.mark.slow
def test_metrics_are_cut_back_to_the_checkpoint(crashed, tmp_path):
    first = by_step(read_metrics(crashed))
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    result = run_cli(["train.max_steps=3", *BASE, "checkpoint.save_interval=2", f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["lm_loss"] == first[3]["lm_loss"] and rows[2]["grad_norm"] == first[3]["grad_norm"]


@pytest.mark.slow
def test_lr_schedule_follows_a_longer_max_steps(crashed, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    result = run_cli(["train.max_steps=8", *BASE, f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LR schedule follows the current config (checkpoint -> now): lr_decay_steps 3 -> 8" in result.stdout
    planned = run_cli(["train.max_steps=8", *BASE, f"run.dir={tmp_path / 'planned'}", "checkpoint.save_final=false"],
                      timeout=600)
    assert planned.returncode == 0, planned.stderr[-3000:]
    resumed, fresh = by_step(read_metrics(run_dir)), by_step(read_metrics(tmp_path / "planned"))
    for step in range(3, 9):
        assert resumed[step]["lr"] == fresh[step]["lr"], step


@pytest.mark.slow
def test_checkpoint_of_other_shapes_is_refused(crashed, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli(["train.max_steps=4", *BASE, "model.moe_intermediate_size=64", f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "model.moe_intermediate_size: 32 in the checkpoint, 64 now" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
