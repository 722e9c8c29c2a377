"""Packed documents are isolated exactly: each document computes what it computes alone.

Rows of 2-4 documents of random lengths (some shorter than the compression ratios, most not
multiples of them) are packed with `segment_ids`; every document's outputs (attention layer) or
logits (whole model) must equal those of the same document run alone, for SWA, CSA (all indexer
phases) and HCA, with every attention backend. fp32, tiny config (window 8, ratios 4 and 16).
"""

import dataclasses
import random

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from conftest import tiny_model_config
from dsv4_train.model import aux_losses
from dsv4_train.model.documents import Blocks, Documents

HIDDEN = 64
# fp32; packed and alone run the same arithmetic on different row sets (gathered vs reshaped
# blocks, other matmul shapes): measured <= 1e-6 relative to the largest entry; a leak across a
# document boundary or a wrong block start moves outputs by > 1e-3.
RTOL = 2e-6
CASES = [(0, "sparse"), (1, "dense"), (1, "warmup"), (1, "sparse"), (2, "sparse")]
BACKENDS = [("dense", 0), ("blockwise", 8), ("flex", 0)]


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _packing(seq, seed):
    """Document lengths (2-4 documents, at least one shorter than 4, lengths not multiples of 4/16)."""
    rng = random.Random(seed)
    count = rng.randint(2, 4)
    cuts = sorted(rng.sample(range(1, seq), count - 1))
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [seq])]
    return lengths


def _segments(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


def test_blocks_restart_per_document():
    docs = Documents.from_segment_ids(_segments([3, 9, 5]).unsqueeze(0))
    assert docs.positions[0].tolist() == [0, 1, 2] + list(range(9)) + list(range(5))
    blocks = Blocks.of(docs, 4)
    # Document 0 (3 tokens): no block; document 1 (tokens 3..11): blocks at 3 and 7; document 2
    # (tokens 12..16): block at 12, its last token 16 stays uncompressed.
    assert blocks.start[0].tolist() == [3, 7, 12]
    assert blocks.previous[0].tolist() == [False, True, False]
    assert blocks.position[0].tolist() == [0, 4, 0]
    assert blocks.visible_prefix(17)[5:8] == [0, 1, 1]


@pytest.mark.parametrize("backend,block", BACKENDS)
@pytest.mark.parametrize("layer_index,phase", CASES)
def test_attention_documents_equal_alone(build_attention, cpu_flex_backward, layer_index, phase, backend, block):
    cfg = tiny_model_config(init_std=0.2, indexer_phase=phase, attention_backend=backend, attention_block_size=block)
    module = build_attention(cfg, layer_index, seed=3)
    seq = 64
    packings = [_packing(seq, 10 * layer_index + i + hash(phase) % 7) for i in range(2)]
    segments = torch.stack([_segments(lengths) for lengths in packings])  # [B, T]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(seq, 2, HIDDEN, generator=gen, requires_grad=True)
    upstream = torch.randn(seq, 2, HIDDEN, generator=gen)

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.0))  # compare the main path's gradients
    try:
        packed = module(x, documents=Documents.from_segment_ids(segments))
        (packed * upstream).sum().backward()
        aux_losses.drain()
        packed_dx = x.grad.clone()
        for row, lengths in enumerate(packings):
            start = 0
            for length in lengths:
                rows = slice(start, start + length)
                alone_x = x.detach()[rows, row : row + 1].clone().requires_grad_(True)
                alone = module(alone_x)
                (alone * upstream[rows, row : row + 1]).sum().backward()
                aux_losses.drain()
                scale = packed.detach().abs().max()
                assert float((alone.detach()[:, 0] - packed.detach()[rows, row]).abs().max() / scale) <= RTOL
                dx_scale = packed_dx.abs().max()
                assert float((alone_x.grad[:, 0] - packed_dx[rows, row]).abs().max() / dx_scale) <= RTOL
                start += length
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_model_documents_equal_alone(megatron_world1, backend):
    from v4_model_helpers import build_tiny

    model = build_tiny(seed=0, attention_backend=backend, attention_block_size=8, init_std=0.1).eval()
    seq = 64
    lengths = [5, 22, 3, 34]
    ids = torch.randint(0, 512, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = model(ids, segment_ids=_segments(lengths).unsqueeze(0))  # [1, T, V]
        start = 0
        for length in lengths:
            alone = model(ids[:, start : start + length])
            assert _relative(alone[0], packed[0, start : start + length]) <= RTOL
            start += length
    # The packing matters: without segment ids the later documents see the earlier ones.
    with torch.no_grad():
        leaky = model(ids)
    assert _relative(leaky[0, 5:27], packed[0, 5:27]) > 1e-3


def test_model_mtp_loss_equals_alone_sum(megatron_world1):
    """Training forward: the LM + MTP losses of a packed row are the documents' own (MTP never
    reads a token of the next document)."""
    from v4_model_helpers import build_tiny

    model = build_tiny(seed=0, attention_backend="blockwise", init_std=0.1).train()
    lengths = [20, 13, 31]
    seq = sum(lengths)
    ids = torch.randint(0, 512, (1, seq), generator=torch.Generator().manual_seed(2))
    # Labels: next token inside the document, masked at each document's last token.
    labels = torch.roll(ids, -1, dims=1)
    mask = torch.ones(1, seq)
    ends = torch.cumsum(torch.tensor(lengths), 0) - 1
    mask[0, ends] = 0
    captured = []
    original = model.compute_language_model_loss

    def capture(labels_, logits_):
        out = original(labels_, logits_)
        captured.append(out.detach())
        return out

    model.compute_language_model_loss = capture
    with torch.no_grad():
        model(ids, labels=labels, loss_mask=mask, segment_ids=_segments(lengths).unsqueeze(0))
        packed_mtp, packed_lm = captured[0][0], captured[-1][0]  # MTP depth 0 runs before the LM loss
        start = 0
        for length in lengths:
            captured.clear()
            model(ids[:, start : start + length], labels=labels[:, start : start + length],
                  loss_mask=mask[:, start : start + length])
            alone_mtp, alone_lm = captured[0][0], captured[-1][0]
            keep = mask[0, start : start + length].bool()
            assert _relative(alone_lm[keep], packed_lm[start : start + length][keep]) <= RTOL
            # MTP at t predicts t+2 from token t+1: positions whose both tokens are in the document.
            inner = slice(0, length - 2)
            assert _relative(alone_mtp[inner], packed_mtp[start : start + length][inner]) <= RTOL
            start += length
    aux_losses.drain()
