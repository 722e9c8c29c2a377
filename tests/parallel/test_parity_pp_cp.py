"""Pipeline (incl. interleaved) and context parallelism of the V4 tiny model vs one process.

Through the real CLI (torchrun, gloo; tests/parallel/harness.py): one reference run per module
saves its initial weights; each layout loads them and trains 5 fp32 steps with the same seed and
global batch. lm_loss, mtp_loss and grad_norm must agree within 1e-5 relative (measured: <= 2e-7;
only summation order differs, while a wrong halo, mask, loss normalisation or stage hand-off moves
them by >1e-3). `pytest -s` prints the table of max relative differences.

The tiny model has 5 layers (hash layers 0-1; CSA 1, 3; HCA 2, 4) + MTP, seq 64, window 8: a 2-way CP
split puts the window, CSA overlap blocks, top-k candidates and the MTP token shift across ranks.
5 layers do not split evenly, so the pipeline layouts are explicit; the interleaved one puts hash
layer 1 on the second pipeline rank (token ids must reach it) and needs the gloo-safe p2p ordering.
"""

import pytest

from dsv4_train.config import validate as validate_mod
from tests.parallel import harness

# fp32 end to end; different layouts only reorder sums (TP/CP reductions, gathered keys).
RTOL = 1e-5
PP2 = "parallel.pipeline_layout=Et*3|t*2mL"
LAYOUTS = [
    ("pp2", 2, ["parallel.pp=2", PP2]),
    ("pp2_vpp2", 2, ["parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_layout=Et|t|t*2|tmL"]),
    ("cp2", 2, ["parallel.cp=2"]),
    ("pp2_ep2", 4, ["parallel.pp=2", "parallel.ep=2", PP2]),
    ("pp2_cp2", 4, ["parallel.pp=2", "parallel.cp=2", PP2]),
    ("tp2_pp2", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", PP2]),
    # The linear-memory attention path (auto runs dense at 64 tokens; the reference is dense).
    ("cp2_tp2_blockwise", 4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "model.attention_backend=blockwise"]),
]
_rows = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_pp_cp")
    yield root, harness.reference_run(root)
    if _rows:
        print("\n" + harness.format_table(_rows))


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_layout_matches_single_process(reference, name, nproc, overrides):
    root, ref = reference
    metrics = harness.layout_run(root, name, ref, overrides, nproc)
    worst = harness.max_relative_differences(ref["metrics"], metrics)
    _rows.append((name, nproc, worst))
    assert all(value <= RTOL for value in worst.values()), (name, worst)


# --- validation of impossible PP / CP combinations (no processes) -------------------------------

def _problems(overrides, world_size):
    from dsv4_train.config.load import compose

    try:
        validate_mod.validate(compose(["conf=tiny_pretrain", *overrides]), world_size=world_size)
    except validate_mod.ConfigError as error:
        return error.problems
    return []


def test_mtp_must_sit_with_the_loss():
    problems = _problems(["parallel.pp=2", "parallel.pipeline_layout=Et*3m|t*2L"], 2)
    assert any("MTP layers (m) on a stage without the loss" in p for p in problems), problems


def test_interleaved_needs_micro_batches_in_groups_of_pp():
    problems = _problems([
        "parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_layout=Et|t|t*2|tmL",
        "train.global_batch_size=6", "train.micro_batch_size=2",
    ], 2)
    assert any("multiple of parallel.pp=2" in p and "train.global_batch_size" in p for p in problems), problems


def test_window_longer_than_a_cp_slice_is_rejected():
    problems = _problems(["parallel.cp=4", "model.sliding_window=20"], 4)
    assert any("model.sliding_window=20" in p and "parallel.cp" in p for p in problems), problems
    assert not _problems(["parallel.cp=2"], 2)  # the tiny recipe itself is fine
