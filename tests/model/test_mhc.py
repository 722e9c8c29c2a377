"""mHC properties (paper §2.2): Sinkhorn comb, coefficient ranges, identity-like init."""

from __future__ import annotations

import torch

from dsv4_train.model.sinkhorn import sinkhorn_comb


def test_sinkhorn_comb_is_doubly_stochastic():
    gen = torch.Generator().manual_seed(0)
    # Logit spread 1 (clearly non-uniform combs; the trained-model regime). Sinkhorn's row
    # convergence slows as the spread grows (measured: 1e-6 at 0.5, 9e-5 at 1, 3e-2 at 2).
    logits = torch.randn(1000, 4, 4, generator=gen)
    comb = sinkhorn_comb(logits, iters=20, eps=1e-6)
    assert bool((comb >= 0).all())
    # The last step normalises columns: col sums = s / (s + eps), within 1e-5 of 1 (eps + fp32).
    assert (comb.sum(dim=-2) - 1).abs().max().item() <= 1e-5
    # Rows are only converged, not normalised last: 20 steps leave <= 9e-5 at this spread.
    assert (comb.sum(dim=-1) - 1).abs().max().item() <= 2e-4


def test_sinkhorn_follows_official_order():
    """One iteration = row softmax + eps, then a column normalisation (paper §2.2)."""
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = 1e-6
    expected = torch.softmax(logits, dim=-1) + eps
    expected = expected / (expected.sum(dim=-2, keepdim=True) + eps)
    assert torch.equal(sinkhorn_comb(logits, iters=1, eps=eps), expected)


def test_fresh_hyper_connection_is_near_identity(megatron_world1):
    """From-scratch init: pre ~ 1/n, post = 1, comb ~ identity, so identical streams collapse to
    the stream itself and a block starts close to a plain residual block."""
    from dsv4_train.model.mhc import HyperConnection
    from dsv4_train.model.transformer_config import build_transformer_config
    from v4_model_helpers import tiny_cfg

    cfg = tiny_cfg()
    hc = HyperConnection(config=build_transformer_config(model_cfg=cfg), hc_mult=4, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    x = torch.randn(8, 2, 1, cfg.hidden_size).expand(-1, -1, 4, -1).contiguous()
    collapsed, post, comb = hc.pre(x)
    # alpha = 0.01 keeps the token-dependent part of each coefficient at the 1e-2 level.
    assert (collapsed - x[:, :, 0]).abs().max().item() <= 0.05 * x.abs().max().item()
    assert (post - 1).abs().max().item() <= 0.05
    assert (comb.diagonal(dim1=-2, dim2=-1) > 0.9).all()
