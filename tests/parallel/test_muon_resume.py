"""Muon's momentum is saved and restored: a run resumed at step 3 continues as if never stopped, in
the same layout and in others: the per-parameter optimizer state of checkpoint/io.py reshards the
momentum like Adam's moments, also when it is sharded by owner over data-parallel ranks
(TP2+SP x DP2 -> EP2, 1 process -> DP2).

Tolerances: same layout 1e-6 relative (weights, momentum, AdamW moments and step, schedule, data
position and RNG are restored exactly); another layout 1e-5, as the layout parity tests (sums are
reordered). Losing the momentum at the resume (zeroed after loading) was measured to move step 5's
lm_loss by 6.0e-4 and grad_norm by 6.1e-4, far outside both (measured: same layout 0.0, the others
at most 9e-8). Without marking each owner's copy as the main replica (checkpoint/io.py) the sharded
TP2+SP x DP2 run cannot save (measured: its save fails).
"""

from __future__ import annotations

import pytest

from tests.helpers import by_step, read_metrics, run_cli
from tests.parallel import harness

SAVE_STEP = 3
MUON_SAVING = ["optim.optimizer=muon", f"checkpoint.save_interval={SAVE_STEP}"]
COMPARED = ("lm_loss", "mtp_loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon_resume")
    reference = harness.reference_run(root, MUON_SAVING)
    saving = harness.layout_run(root, "tp2_sp_dp2_saved", reference, ["parallel.tp=2", "parallel.sp=true"], 4,
                                MUON_SAVING)
    worst = harness.max_relative_differences(reference["metrics"], saving)  # itself a parity check
    assert all(value <= 1e-5 for value in worst.values()), worst
    step_dir = f"step_{SAVE_STEP:08d}"
    return {"root": root, "reference": reference["metrics"], "single": root / "reference" / "checkpoints" / step_dir,
            "tp2_sp_dp2": root / "tp2_sp_dp2_saved" / "checkpoints" / step_dir}


@pytest.mark.slow
@pytest.mark.parametrize("name,source,nproc,overrides,tolerance", [
    ("same_layout", "single", 1, [], 1e-6),
    ("tp2_sp_dp2_to_ep2", "tp2_sp_dp2", 2, ["parallel.ep=2"], 1e-5),
    ("single_to_dp2", "single", 2, [], 1e-5),
], ids=["same_layout", "tp2_sp_dp2_to_ep2", "single_to_dp2"])
def test_muon_resume_continues_the_run(saved, name, source, nproc, overrides, tolerance):
    run_dir = saved["root"] / name
    proc = run_cli([*harness.BASE, "optim.optimizer=muon", *overrides, f"run.dir={run_dir}",
                    f"checkpoint.load={saved[source]}"], nproc=nproc)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert f"resumed from {saved[source]}" in proc.stdout
    resumed, reference = by_step(read_metrics(run_dir)), saved["reference"]
    assert sorted(resumed) == [4, 5]
    worst = {key: max(abs(resumed[s][key] - reference[s][key]) / abs(reference[s][key]) for s in resumed)
             for key in COMPARED}
    print(f"\n{name}: max relative difference over steps 4-5: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert all(value <= tolerance for value in worst.values()), (name, worst)
