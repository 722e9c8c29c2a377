"""Validation loss (train.eval_interval / train.eval_iters) on real runs of the tiny recipe.

* Evaluating does not disturb training: per-step training metrics with evaluation equal those
  without (exactly: evaluation reads its own data stream and leaves no state behind).
* `val_loss` and `val_mtp_loss` appear at the configured steps and at the end, and are the same
  under DP2 and PP2 as in one process within 1e-6 relative (fp32; the layouts only reorder sums).
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

EVAL = ["train.eval_interval=2", "train.eval_iters=2"]
# fp32; a layout only reorders sums (DP: the mean over ranks' tokens; PP: the same layers on two
# ranks). Measured relative differences: DP2 val_loss 1.0e-8, val_mtp_loss 8.0e-8; PP2 val_loss 0,
# val_mtp_loss 7.7e-8. Other weights move them by far more: two training steps between the
# evaluations at steps 2 and 4 change val_loss by > 1e-3 relative (checked below).
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    return {"root": root, **harness.reference_run(root, EVAL)}


@pytest.mark.slow
def test_evaluation_leaves_training_unchanged_and_reports_at_interval(reference):
    plain = harness.reference_run(reference["root"] / "plain")
    for step, row in reference["metrics"].items():
        for key in harness.COMPARED:
            assert row[key] == plain["metrics"][step][key], (step, key)
        expected = step % 2 == 0 or step == harness.STEPS
        assert ("val_loss" in row) == expected, step
        assert "val_loss" not in plain["metrics"][step]
    assert 0 < reference["metrics"][2]["val_loss"] < 10
    assert 0 < reference["metrics"][2]["val_mtp_loss"] < 10


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", [
    ("dp2", 2, []),
    ("pp2", 2, ["parallel.pp=2", 'parallel.pipeline_layout="Et*3|t*2mL"']),
])
def test_val_loss_is_layout_independent(reference, name, nproc, overrides):
    metrics = harness.layout_run(reference["root"], name, reference, overrides, nproc, extra=EVAL)
    steps = [s for s, row in reference["metrics"].items() if "val_loss" in row]
    assert steps == [2, 4, 5], steps
    val = {s: reference["metrics"][s]["val_loss"] for s in steps}
    assert abs(val[4] - val[2]) > 1e-3 * val[2], val  # the bound below is far below a real change
    assert [s for s, row in metrics.items() if "val_loss" in row] == steps, (name, sorted(metrics))
    worst = {key: max(abs(metrics[s][key] - reference["metrics"][s][key]) / abs(reference["metrics"][s][key])
                      for s in steps) for key in ("val_loss", "val_mtp_loss")}
    print(f"\n{name}: max relative difference to one process {worst}; one-process val_loss by step {val}")
    assert all(value <= TOLERANCE for value in worst.values()), (name, worst)
