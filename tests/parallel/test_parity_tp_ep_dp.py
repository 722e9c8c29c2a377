"""Tensor, sequence, expert and data parallel layouts of the tiny V4 recipe reproduce 1 process.

Each layout loads the reference run's initial weights through dist_checkpointing resharding and
trains 5 steps with the same seed, data and global batch (tests/parallel/harness.py); per-step
lm_loss, mtp_loss and grad_norm must match within 1e-5 relative.

Tolerance 1e-5 (fp32): a layout only changes the order of floating-point sums (TP partial matmuls
and all-reduces, the expert dispatch order, DP gradient reduction); over 5 Adam steps that moves
the last bits (measured <= 3e-7). A real bug is far larger: e.g. forgetting the TP gradient
reduction of the mHC weights under SP gives 6e-5 on grad_norm at step 1, loading the wrong experts
under EP gave 3e-5 on lm_loss; under TP without SP, dropping the MoE router gate's TP gradient sum
gave 6.5e-4 on grad_norm, reduce-scattering the MoE output gradient (counting it tp times) 3.9e-2,
and every TP rank taking rank 0's token ids for hash routing 8.7e-4 on lm_loss.

Layouts (DP2 alone is tests/train/test_training_runs.py::test_data_parallel_2_matches_single_process):
* tp2_sp_blockwise: the linear-memory attention path (`auto` runs the dense path at the recipe's 64
  tokens, which fit one query block; the 1-process reference is dense, the paths agree to ~1e-7) with
  attention heads / indexer heads / grouped output projection, shared expert, expert TP
  (etp = tp), vocab-parallel embedding, head and MTP, all with the sequence split over TP;
* ep2_alltoall: experts split over 2 ranks (dense parameters data-parallel, distributed optimizer);
* ep2_dp2_allgather_overlap: ep=2 on 4 ranks (expert data parallel 2), the allgather dispatcher,
  with the gradient reduction overlapped with the backward in small buckets (the CUDA default);
* tp2_sp_ep2: TP2+SP times EP2 with expert TP 2 (token gathers of uneven size inside the dispatcher);
* tp2: TP2 without SP: attention, mHC and head in the replicated TP layout, each MoE sub-layer
  sequence-parallel inside (model/moe.py: scatter, Megatron's SP MoE path, gather; the router
  gate's partial gradients summed over TP by the layer);
* tp2_ep2: the same with EP2 (expert TP 2) on 4 ranks.

Run with `-s` to see the table of measured maximum relative differences.
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

TOLERANCE = 1e-5  # relative; see the module docstring

LAYOUTS = [
    ("tp2_sp_blockwise", 2, ["parallel.tp=2", "parallel.sp=true", "model.attention_backend=blockwise"]),
    ("ep2_alltoall", 2, ["parallel.ep=2", "parallel.moe_dispatcher=alltoall"]),
    ("ep2_dp2_allgather_overlap", 4, ["parallel.ep=2", "parallel.moe_dispatcher=allgather",
                                      "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000"]),
    ("tp2_sp_ep2", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    ("tp2", 2, ["parallel.tp=2", "parallel.sp=false"]),
    ("ep2_allgather", 2, ["parallel.ep=2", "parallel.moe_dispatcher=allgather"]),
    # tp2 (no SP) with ep2 on 4 ranks also passes (measured 3.8e-8 / 7.8e-8 / 2.4e-7); left out of
    # the suite's time budget: tp2 and tp2_sp_ep2 cover its pieces.
]

_rows = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_tp_ep_dp")
    yield {"root": root, **harness.reference_run(root)}
    if _rows:
        print("\nmax relative difference to the 1-process run over 5 steps\n" + harness.format_table(_rows))


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_single_process(reference, name, nproc, overrides):
    metrics = harness.layout_run(reference["root"], name, reference, overrides, nproc)
    worst = harness.max_relative_differences(reference["metrics"], metrics)
    _rows.append((name, nproc, worst))
    print("\n" + harness.format_table([(name, nproc, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), (name, worst)
