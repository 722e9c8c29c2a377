"""The fused Sinkhorn autograd node (sinkhorn._SinkhornComb) against autograd through the plain loop."""

from __future__ import annotations

import pytest
import torch

from dsv4_train.model import sinkhorn as mhc_sinkhorn
from dsv4_train.model.sinkhorn import sinkhorn_comb


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


@pytest.fixture
def dynamo_enabled(monkeypatch):
    """The suite turns torch.compile off (tests/conftest.py); this test compiles, so it lifts that for
    itself (torch reads TORCHDYNAMO_DISABLE when a function is wrapped) and drops its kernels after."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    monkeypatch.setattr(mhc_sinkhorn, "_COMPILE_FAILED", set())
    mhc_sinkhorn._compiled.cache_clear()
    yield
    mhc_sinkhorn._compiled.cache_clear()


def test_compiled_step_loops_equal_eager_bitwise(dynamo_enabled):
    # The torch.compile'd step loops (model.sinkhorn_kernel=compiled; what `auto` runs on CUDA), here
    # with inductor's CPU backend: forward equal to the plain loop and gradients equal to the eager
    # node, bit for bit (measured torch.equal for both), at two token counts (the second compiles
    # the loops dynamic in the token count). ~25 s of compilation.
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    for shape in [(64, 2), (33, 1)]:
        gen = torch.Generator().manual_seed(sum(shape))
        logits = 4.0 * torch.randn(*shape, 4, 4, generator=gen)
        upstream = torch.randn(*shape, 4, 4, generator=gen)
        compiled_in, eager_in, ref_in = (logits.clone().requires_grad_() for _ in range(3))
        compiled = sinkhorn_comb(compiled_in, iters=20, eps=1e-6, compiled=True)
        eager = sinkhorn_comb(eager_in, iters=20, eps=1e-6, compiled=False)
        assert torch.equal(compiled, _reference_sinkhorn(ref_in, 20, 1e-6))
        (compiled * upstream).sum().backward()
        (eager * upstream).sum().backward()
        assert torch.equal(compiled_in.grad, eager_in.grad)
    # The loops really ran compiled (not silently eager): forward and backward graphs, twice each.
    assert counters["stats"]["unique_graphs"] - graphs_before >= 4


def test_sinkhorn_kernel_choice():
    assert mhc_sinkhorn.resolve_sinkhorn_kernel("auto", torch.device("cpu")) is False
    assert mhc_sinkhorn.resolve_sinkhorn_kernel("auto", torch.device("cuda")) is True
    assert mhc_sinkhorn.resolve_sinkhorn_kernel("compiled", torch.device("cpu")) is True
    assert mhc_sinkhorn.resolve_sinkhorn_kernel("eager", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="model.sinkhorn_kernel='fused' is not one of"):
        mhc_sinkhorn.resolve_sinkhorn_kernel("fused", torch.device("cpu"))


@pytest.mark.parametrize("fallback", [True, False], ids=["auto", "compiled"])
def test_compile_failure_falls_back_only_under_auto(monkeypatch, fallback):
    # A compiler that fails (as inductor can on a machine without a working toolchain): `auto`
    # (fallback) warns once and gives the eager values and gradients; `compiled` raises the error.
    def failing_compile(loop):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(mhc_sinkhorn, "_compiled", failing_compile)
    monkeypatch.setattr(mhc_sinkhorn, "_COMPILE_FAILED", set())
    logits = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    ours_in, eager_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    if not fallback:
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            sinkhorn_comb(ours_in, iters=20, eps=1e-6, compiled=True, fallback=False)
        return
    with pytest.warns(UserWarning, match="model.sinkhorn_kernel=auto: compiling mHC's Sinkhorn loop"):
        ours = sinkhorn_comb(ours_in, iters=20, eps=1e-6, compiled=True, fallback=True)
    eager = sinkhorn_comb(eager_in, iters=20, eps=1e-6)
    assert torch.equal(ours, eager)
    upstream = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="_steps_backward_stacked"):  # the backward loop's own attempt
        (ours * upstream).sum().backward()
    (eager * upstream).sum().backward()
    assert torch.equal(ours_in.grad, eager_in.grad)
