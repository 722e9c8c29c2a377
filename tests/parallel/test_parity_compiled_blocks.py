"""`model.compile=true` under a multi-process layout: TP2 + SP + EP2 (2 gloo processes, Megatron's
all-to-all token dispatcher, which stays eager inside the compiled blocks), 5 training steps from
the reference's initial weights (tests/parallel/harness.py), against the eager one-process run.

Tolerance 1e-5 relative on the per-step lm_loss, mtp_loss and grad_norm: the layout alone moves
them by up to ~2e-7 (reordered TP/EP sums), compiled kernels reorder fp32 sums once more
(tests/model/test_block_compile.py); measured 2.0e-8 / 7.8e-8 / 2.0e-7. A wrong graph (a stale
guard, a dropped side effect such as the expert-bias token counts) moves them by far more.
~3 min, most of it compiling on two processes.
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

TOLERANCE = 1e-5
LAYOUT = ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1", "model.compile=true"]


@pytest.mark.slow
def test_compiled_blocks_match_eager_under_tp2_sp_ep2(tmp_path):
    reference = harness.reference_run(tmp_path)
    compiled = harness.layout_run(tmp_path, "tp2_sp_ep2_compiled", reference, LAYOUT, 2,
                                  env={"TORCHDYNAMO_DISABLE": "0"})
    worst = harness.max_relative_differences(reference["metrics"], compiled)
    print("\n" + harness.format_table([("tp2_sp_ep2 compiled vs eager", 2, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), worst
