"""Packed documents (data.document_mask=true) under TP2 + SP reproduce one process.

One process with document masks is proven exact per document (tests/model/test_documents.py);
here the same 5 fp32 steps under TP2+SP (heads, indexer heads and the grouped output projection
split; the documents' masks, blocks and RoPE positions identical on both ranks) must give the same
lm_loss, mtp_loss and grad_norm within 1e-5 relative (the layout-parity tolerance: TP only reorders
sums, measured <= 3e-7 without documents).
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

TOLERANCE = 1e-5
DOCUMENTS = ["data.document_mask=true"]


@pytest.mark.slow
def test_documents_tp2_sp_match_single_process(tmp_path):
    reference = harness.reference_run(tmp_path, DOCUMENTS)
    plain = harness.reference_run(tmp_path / "plain")
    # The masks are active: the same data without them trains differently.
    assert harness.max_relative_differences(reference["metrics"], plain["metrics"])["lm_loss"] > 1e-4
    metrics = harness.layout_run(tmp_path, "tp2_sp_documents", reference, ["parallel.tp=2", "parallel.sp=true"], 2,
                                 extra=DOCUMENTS)
    worst = harness.max_relative_differences(reference["metrics"], metrics)
    print("\n" + harness.format_table([("tp2_sp_documents", 2, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), worst
