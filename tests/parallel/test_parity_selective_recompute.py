"""Selective recompute under a multi-process layout (TP2 + SP, 2 gloo processes, 5 training steps
from the same initial weights, tests/parallel/harness.py): the default module set (mhc, moe_act)
gives the same per-step lm_loss, mtp_loss and grad_norm as no recompute in that layout.

Tolerance 1e-6 relative (the issue's bound): the recomputed parts repeat the same fp32 ops, and the
single-process test (tests/model/test_selective_recompute.py) measures bitwise-equal gradients.
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

TOLERANCE = 1e-6
LAYOUT = ["parallel.tp=2", "parallel.sp=true"]


@pytest.mark.slow
def test_selective_recompute_matches_none_under_tp2_sp(tmp_path):
    reference = harness.reference_run(tmp_path)
    plain = harness.layout_run(tmp_path, "tp2_none", reference, LAYOUT, 2)
    selective = harness.layout_run(tmp_path, "tp2_selective", reference, [*LAYOUT, "train.recompute=selective"], 2)
    worst = harness.max_relative_differences(plain, selective)
    print("\n" + harness.format_table([("tp2_sp selective vs none", 2, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), worst
