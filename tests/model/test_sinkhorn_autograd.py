"""The fused Sinkhorn autograd node (mhc._SinkhornComb) against autograd through the plain loop."""

from __future__ import annotations

import pytest
import torch

from dsv4_train.model.mhc import sinkhorn_comb


def _reference_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The official-order loop, differentiated op by op by autograd."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


@pytest.mark.parametrize(
    "iters,n,dtype,shape",
    [
        (20, 4, torch.float32, (64, 2)),  # the model's case: [s, b, hc_mult, hc_mult]
        (20, 4, torch.float32, (1000,)),
        (1, 4, torch.float32, (64, 2)),
        (3, 2, torch.float64, (64, 2)),
        (20, 3, torch.float32, (33, 1)),
        (5, 4, torch.bfloat16, (64, 2)),
    ],
)
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_fused_sinkhorn_matches_autograd(iters, n, dtype, shape, spread):
    # Forward exact (torch.equal): the fused node applies the same IEEE operations in the same order
    # to every element. Backward: the same gradient formula, rearranged to one op fewer per step
    # ((g - sum(g*y)) / d instead of g/d - sum(g*(y/d))), so only rounding may differ: a few ulps
    # per step over 2*iters - 1 steps; bound 16 * eps(dtype) of the largest gradient entry
    # (measured 2.4e-7 = 2 eps in fp32 at 20 iterations).
    gen = torch.Generator().manual_seed(iters * 10 + n)
    logits = (spread * torch.randn(*shape, n, n, generator=gen)).to(dtype)
    upstream = torch.randn(*shape, n, n, generator=gen).to(dtype)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = sinkhorn_comb(ours_in, iters=iters, eps=1e-6)
    ref = _reference_sinkhorn(ref_in, iters, 1e-6)
    assert torch.equal(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    bound = 16 * torch.finfo(dtype).eps * ref_in.grad.abs().max().item()
    assert (ours_in.grad - ref_in.grad).abs().max().item() <= bound


def test_fused_sinkhorn_gradcheck():
    # Finite differences in float64 (default gradcheck tolerances): the backward is the true gradient.
    logits = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn_comb(x, iters=5, eps=1e-6), (logits,))
