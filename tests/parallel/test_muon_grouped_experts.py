"""Muon on the grouped experts' stacked weights (model/grouped_experts.py) trains exactly as Muon on
Megatron's per-expert modules (`SequentialMLP`), in one process and under EP2, DP2 (optimizer state
sharded by owner) and TP2+SP x EP2 (expert TP 2: each gate / up / down slice gathered whole).

The reference run (1 process, sequential experts) saves its initial weights, a full checkpoint at
step 3 and one at step 5. Each grouped run loads the initial weights, trains the same 5 steps and
saves step 5; then the routed experts' tensors of the two step-5 checkpoints are compared key by key:
weights and Muon momentum (grouped and sequential share checkpoint keys: model/grouped_checkpoint.py),
and the per-step losses and grad norm as in the layout parity tests (1e-5 relative).
Checkpoints cross between the two: grouped resumes the sequential step-3 checkpoint (momentum
included), and sequential resumes a grouped one; steps 4-5 must match the uninterrupted run.

Tolerance: max |difference| / max |reference| per expert tensor <= TOLERANCE (fp32). Only the order
of floating-point sums differs (measured, module's printed table: one process bit-identical, every
tensor); orthogonalising a stacked tensor whole instead of per expert and half (the bug this guards)
changes the update at O(1). Not compared under EP/TP: tensors whose gradient is ~1e-12 (the MTP
block's mHC `fn`), which Muon's Frobenius normalisation amplifies from rounding noise to a full update
in any layout (measured EP2: 7e-4 relative on mtp.0.block.hc_ffn.fn, 4e-4 on its momentum; expert
weights and momentum at most 5.5e-7 in every layout, TP2+SP x EP2 the worst).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import by_step, read_metrics, run_cli
from tests.parallel import harness

TOLERANCE = 1e-5  # relative to each tensor's largest entry; see the module docstring
RESUME_TOLERANCE = 1e-5  # relative, per-step lm_loss / mtp_loss / grad_norm, as the layout parity tests
SAVE_STEP = 3
MUON = ["optim.optimizer=muon"]
SEQUENTIAL, GROUPED = ["model.moe_expert_compute=sequential"], ["model.moe_expert_compute=grouped"]
SAVING = [f"checkpoint.save_interval={SAVE_STEP}", "checkpoint.save_final=true", "checkpoint.keep_last=3"]  # steps 0, 3, 5
LAYOUTS = [
    ("one_process", 1, []),
    ("ep2", 2, ["parallel.ep=2"]),
    ("dp2_distributed_optimizer", 2, ["parallel.distributed_optimizer=true"]),
    ("tp2_sp_ep2_etp2", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
]
_rows = []


def _step_dir(run_dir, step: int):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _tensors(checkpoint) -> dict:
    from megatron.core.dist_checkpointing import load_plain_tensors

    return load_plain_tensors(str(checkpoint))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon_grouped")
    yield {"root": root, **harness.reference_run(root, [*MUON, *SEQUENTIAL, *SAVING])}
    if _rows:
        print("\nMuon, grouped vs sequential experts: worst relative tensor difference at step "
              f"{harness.STEPS}\n" + "\n".join(f"{name:<28}{nproc:>3}  {worst:.2e}  ({key})"
                                             for name, nproc, worst, key in _rows))


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_grouped_muon_matches_sequential_muon(reference, megatron_world1, name, nproc, overrides):
    metrics = harness.layout_run(reference["root"], name, reference, [*overrides, *GROUPED, *SAVING], nproc, MUON)
    losses = harness.max_relative_differences(reference["metrics"], metrics)
    assert all(value <= RESUME_TOLERANCE for value in losses.values()), (name, losses)
    expected = _tensors(_step_dir(reference["root"] / "reference", harness.STEPS))
    got = _tensors(_step_dir(reference["root"] / name, harness.STEPS))
    assert sorted(got) == sorted(expected)
    experts = [key for key in expected if "experts.experts.linear_fc" in key]  # routed only (not shared_experts)
    assert any("momentum_buffer" in key for key in experts), experts  # the Muon state is compared
    worst = {key: ((got[key] - expected[key]).abs().max() / expected[key].abs().max().clamp_min(1e-12)).item()
             for key in (expected if nproc == 1 else experts)
             if torch.is_tensor(expected[key]) and expected[key].is_floating_point()}
    key = max(worst, key=worst.get)
    _rows.append((name, nproc, worst[key], key))
    assert worst[key] <= TOLERANCE, (name, key, worst[key])


def _resume(reference, name: str, checkpoint, overrides, nproc: int) -> dict:
    run_dir = reference["root"] / name
    proc = run_cli([*harness.BASE, *MUON, *overrides, f"run.dir={run_dir}", f"checkpoint.load={checkpoint}"],
                   nproc=nproc)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert f"resumed from {checkpoint}" in proc.stdout
    resumed, expected = by_step(read_metrics(run_dir)), reference["metrics"]
    assert sorted(resumed) == [SAVE_STEP + 1, harness.STEPS]
    worst = {key: max(abs(resumed[s][key] - expected[s][key]) / abs(expected[s][key]) for s in resumed)
             for key in harness.COMPARED}
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides", [(1, []), (2, ["parallel.ep=2"])], ids=["one_process", "ep2"])
def test_grouped_resumes_sequential_muon_checkpoint(reference, nproc, overrides):
    checkpoint = _step_dir(reference["root"] / "reference", SAVE_STEP)
    worst = _resume(reference, f"grouped_from_sequential_{nproc}", checkpoint, [*GROUPED, *overrides], nproc)
    assert all(value <= RESUME_TOLERANCE for value in worst.values()), worst


@pytest.mark.slow
def test_sequential_resumes_grouped_muon_checkpoint(reference):
    """The EP2 grouped run's step-3 checkpoint (momentum of the stacked weights, saved per expert)
    resumes with per-expert modules in one process."""
    source = reference["root"] / "ep2"
    if not _step_dir(source, SAVE_STEP).exists():
        harness.layout_run(reference["root"], "ep2", reference, ["parallel.ep=2", *GROUPED, *SAVING], 2, MUON)
    worst = _resume(reference, "sequential_from_grouped_ep2", _step_dir(source, SAVE_STEP), SEQUENTIAL, 1)
    assert all(value <= RESUME_TOLERANCE for value in worst.values()), worst
