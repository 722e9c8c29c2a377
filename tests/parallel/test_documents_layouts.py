"""Packed documents (data.document_mask=true) under TP2 + SP and under CP2 reproduce one process.

One process with document masks is proven exact per document (tests/model/test_documents.py);
here the same 5 fp32 steps must give the same lm_loss, mtp_loss and grad_norm within 1e-5 relative
(the layout-parity tolerance: a layout only reorders sums, measured <= 3e-7 without documents):
* TP2+SP: heads, indexer heads and the grouped output projection split; the documents' masks,
  blocks and RoPE positions identical on both ranks;
* CP2: documents and compression blocks straddle the two halves; each rank compresses the blocks
  that end on it and the entries are summed over the ranks; MTP's shift crosses the split.
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

TOLERANCE = 1e-5
DOCUMENTS = ["data.document_mask=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    reference = harness.reference_run(root, DOCUMENTS)
    plain = harness.reference_run(root / "plain", ["data.document_mask=false"])
    # The masks are active: the same data without them trains differently.
    assert harness.max_relative_differences(reference["metrics"], plain["metrics"])["lm_loss"] > 1e-4
    return {"root": root, **reference}


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("tp2_sp_documents", ["parallel.tp=2", "parallel.sp=true"]),
    ("cp2_documents", ["parallel.cp=2"]),
])
def test_documents_layout_matches_single_process(reference, name, overrides):
    metrics = harness.layout_run(reference["root"], name, reference, overrides, 2, extra=DOCUMENTS)
    worst = harness.max_relative_differences(reference["metrics"], metrics)
    print("\n" + harness.format_table([(name, 2, worst)]))
    assert all(value <= TOLERANCE for value in worst.values()), (name, worst)
