"""Non-finite steps (train/nonfinite.py) on real runs.

* A NaN planted in rank 0's gradients at step 3 of a 2-process DP run (test hook) is skipped on both
  ranks, and the parameters after the run (expert biases included) equal, bit for bit, those of a run
  told to skip that batch (train.skip_steps=[3]): the bad step changed nothing.
* train.on_nonfinite=stop ends the run at that step with exit code 3 and a message naming the step
  and the fixes; no checkpoint of that step or later exists.
* A diverging run (absurd LR) stops after more than train.max_skipped_steps skipped steps in a row,
  and every checkpoint it wrote holds finite parameters.
"""

from __future__ import annotations

import pytest
import torch

from dsv4_train.train.nonfinite import EXIT_NONFINITE
from tests.helpers import by_step, read_metrics, run_cli

BASE = ["train.max_steps=5", "optim.warmup_steps=1"]


def _model_tensors(checkpoint_dir) -> dict:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys(checkpoint_id=str(checkpoint_dir))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
            and "_extra_state" not in k}


@pytest.mark.slow
def test_nan_step_is_skipped_everywhere_and_changes_nothing(tmp_path):
    nan_run, skip_run = tmp_path / "nan", tmp_path / "skip"
    result = run_cli([*BASE, f"run.dir={nan_run}"], nproc=2, env={"DSV4_TEST_NAN_AT_STEP": "3"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite loss or gradient on some rank; the step was skipped on every rank" in result.stdout
    reference = run_cli([*BASE, "train.skip_steps=[3]", f"run.dir={skip_run}"], nproc=2, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    rows = by_step(read_metrics(nan_run))
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    ours, theirs = (_model_tensors(run / "checkpoints" / "step_00000005") for run in (nan_run, skip_run))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]
    assert any(k.endswith("expert_bias") for k in ours)


@pytest.mark.slow
def test_stop_policy_ends_the_run_at_the_bad_step(tmp_path):
    run_dir = tmp_path / "stop"
    result = run_cli([*BASE, "train.on_nonfinite=stop", "checkpoint.save_interval=1", "checkpoint.keep_last=10",
                      f"run.dir={run_dir}"], env={"DSV4_TEST_NAN_AT_STEP": "3"}, timeout=600)
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert "step 3: the loss or a gradient is not finite; the step was not applied and the run stops" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]


@pytest.mark.slow
def test_diverging_run_stops_and_never_saves_non_finite_parameters(tmp_path):
    run_dir = tmp_path / "diverge"
    result = run_cli(["train.max_steps=12", "optim.warmup_steps=1", "optim.lr=1e4", "optim.min_lr=0",
                      "train.max_skipped_steps=2", "checkpoint.save_interval=1", "checkpoint.keep_last=20",
                      f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert "(more than train.max_skipped_steps=2); the run has diverged and stops" in result.stderr
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert saved
    for checkpoint in saved:
        assert all(bool(torch.isfinite(t).all()) for t in _model_tensors(checkpoint).values()), checkpoint


def test_loss_spike_is_reported_against_the_running_mean():
    """A loss above train.spike_factor x the mean of the recent losses is reported (with that mean);
    one at or below it is not, nor is any loss before 6 steps of history or with the check off."""
    from types import SimpleNamespace

    from dsv4_train.train.nonfinite import NonFinitePolicy

    cfg = SimpleNamespace(on_nonfinite="skip", max_skipped_steps=3, spike_factor=2.0)
    policy = NonFinitePolicy(cfg)
    assert [policy.after_good_step(1.0) for _ in range(6)] == [None] * 6
    assert policy.after_good_step(2.0) is None  # exactly 2 x the mean 1.0: not above it
    mean = (6 * 1.0 + 2.0) / 7
    assert policy.after_good_step(2 * mean + 1e-6) == pytest.approx(mean, rel=1e-12)  # same arithmetic
    early = NonFinitePolicy(cfg)
    assert [early.after_good_step(x) for x in (1.0, 1.0, 100.0)] == [None, None, None]  # too little history
    off = NonFinitePolicy(SimpleNamespace(on_nonfinite="skip", max_skipped_steps=3, spike_factor=0.0))
    assert [off.after_good_step(x) for x in [1.0] * 6 + [100.0]] == [None] * 7
