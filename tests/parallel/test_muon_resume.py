"""Muon's momentum is saved and restored: a run resumed at step 3 continues as if never stopped, in
the same layout and in another one (TP2+SP -> EP2: the per-parameter optimizer state of
checkpoint/io.py reshards the momentum like Adam's moments).

Tolerances: same layout 1e-6 relative (weights, momentum, AdamW moments and step, schedule, data
position and RNG are restored exactly); another layout 1e-5, as the layout parity tests (sums are
reordered). Losing the momentum at the resume (zeroed after loading) was measured to move step 5's
lm_loss by 6.0e-4 and grad_norm by 6.1e-4, far outside both (measured: same layout 0.0,
TP2+SP -> EP2 at most 9e-8).
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
    harness.layout_run(root, "tp2_sp_saved", reference, ["parallel.tp=2", "parallel.sp=true"], 2, MUON_SAVING)
    step_dir = f"step_{SAVE_STEP:08d}"
    return {"root": root, "reference": reference["metrics"],
            "single": root / "reference" / "checkpoints" / step_dir, "tp2_sp": root / "tp2_sp_saved" / "checkpoints" / step_dir}


@pytest.mark.slow
@pytest.mark.parametrize("name,source,nproc,overrides,tolerance", [
    ("same_layout", "single", 1, [], 1e-6),
    ("tp2_sp_to_ep2", "tp2_sp", 2, ["parallel.ep=2"], 1e-5),
], ids=["same_layout", "tp2_sp_to_ep2"])
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
