"""Grouped experts under expert parallelism reproduce Megatron's SequentialMLP in one process.

The reference run (1 process) uses `model.moe_expert_compute=sequential` and saves its initial
weights; the layout runs load them with the grouped experts (model/grouped_experts.py: stacked
weights filled from SequentialMLP's per-expert checkpoint keys, resharded over EP) and train the
same 5 steps (tests/parallel/harness.py). So this covers, at once, the checkpoint mapping under EP,
the grouped GEMMs on a rank's share of the experts, and Megatron's dispatchers feeding them. The
sequential run's full step-3 checkpoint (with the optimizer's per-expert Adam moments) also
resumes with grouped experts, in one process and under EP2.

Tolerance 1e-5 relative on per-step lm_loss, mtp_loss and grad_norm, as for the other layouts
(tests/parallel/test_parity_tp_ep_dp.py): the expert path and the layout change only the order
of floating-point sums (measured: <= 1.3e-7 on every quantity, layouts and resumes alike); loading the wrong expert shard moved lm_loss by ~3e-5 (the other
layout tests' record) and a wrong clamp or prob would move it far more.
"""

from __future__ import annotations

import pytest

from tests.helpers import by_step, read_metrics, run_cli
from tests.parallel import harness

TOLERANCE = 1e-5  # relative; see the module docstring
SAVE_STEP = 3
GROUPED = ["model.moe_expert_compute=grouped"]
LAYOUTS = [
    ("ep2_alltoall_grouped", 2, ["parallel.ep=2", "parallel.moe_dispatcher=alltoall", *GROUPED]),
    ("one_process_grouped", 1, GROUPED),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_grouped")
    extra = ["model.moe_expert_compute=sequential", f"checkpoint.save_interval={SAVE_STEP}"]
    return {"root": root, **harness.reference_run(root, extra=extra)}


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_grouped_layout_matches_sequential_single_process(reference, name, nproc, overrides):
    metrics = harness.layout_run(reference["root"], name, reference, overrides, nproc)
    worst = harness.max_relative_differences(reference["metrics"], metrics)
    print("\n" + harness.format_table([(name, nproc, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), (name, worst)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides", [(1, []), (2, ["parallel.ep=2"])], ids=["one_process", "ep2"])
def test_grouped_resumes_sequential_full_checkpoint(reference, nproc, overrides):
    """A full checkpoint (model + Adam moments per expert key) saved at step 3 by the sequential
    run resumes with grouped experts: steps 4-5 match the uninterrupted run within 1e-5 (step 5
    comes after an update that uses the loaded moments; fresh moments were measured to move it by
    ~1e-2 in tests/parallel/test_cross_layout_resume.py)."""
    checkpoint = reference["root"] / "reference" / "checkpoints" / f"step_{SAVE_STEP:08d}"
    run_dir = reference["root"] / f"resumed_grouped_{nproc}"
    proc = run_cli([*harness.BASE, *GROUPED, *overrides, f"run.dir={run_dir}", f"checkpoint.load={checkpoint}"],
                   nproc=nproc)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert f"resumed from {checkpoint}" in proc.stdout
    resumed, expected = by_step(read_metrics(run_dir)), reference["metrics"]
    assert sorted(resumed) == [4, 5]
    worst = {key: max(abs(resumed[s][key] - expected[s][key]) / abs(expected[s][key]) for s in resumed)
             for key in ("lm_loss", "mtp_loss", "grad_norm")}
    print(f"\nsequential step {SAVE_STEP} -> grouped x{nproc}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert all(value <= TOLERANCE for value in worst.values()), worst
