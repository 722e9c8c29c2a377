"""Indexer KL loss, top-k selection and the auxiliary-loss tracker."""

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from conftest import tiny_model_config
from dsv4_train.model import aux_losses
from dsv4_train.model.indexer import indexer_kl_loss


def _reference_kl(scores, mass, support):
    """Row-by-row KL(target || softmax(scores)) over the support, plain Python."""
    values = []
    for b in range(scores.shape[0]):
        for t in range(scores.shape[1]):
            idx = [s for s in range(scores.shape[2]) if support[b, t, s]]
            total = sum(float(mass[b, t, s]) for s in idx)
            if not idx or total <= 0:
                continue
            log_z = math.log(sum(math.exp(float(scores[b, t, s])) for s in idx))
            kl = 0.0
            for s in idx:
                p = float(mass[b, t, s]) / total
                if p > 0:
                    kl += p * (math.log(p) - (float(scores[b, t, s]) - log_z))
            values.append(kl)
    return sum(values) / len(values)


def test_kl_loss_matches_row_by_row_reference():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 12, 6, generator=gen)
    mass = torch.rand(2, 12, 6, generator=gen)
    mass[0, 3, 2] = 0.0  # zero target mass inside the support
    support = torch.rand(2, 12, 6, generator=gen) > 0.4
    support[:, :2] = False  # rows with no visible entry are skipped
    loss = indexer_kl_loss(scores, mass, support)
    # fp32 vs float64 Python: ~1e-7 relative rounding; 1e-5 relative tolerance.
    assert math.isclose(loss.item(), _reference_kl(scores, mass, support), rel_tol=1e-5)


def test_kl_loss_is_zero_when_the_indexer_matches_the_target_and_gradients_are_finite():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 5, 7, generator=gen, requires_grad=True)
    support = torch.ones(1, 5, 7, dtype=torch.bool).tril()  # row 0 sees one entry ... causal shape
    support[0, 0] = False  # and one row sees nothing
    target = torch.softmax(scores.detach().masked_fill(~support, float("-inf")), -1).nan_to_num(0.0)
    loss = indexer_kl_loss(scores, target * 3.0, support)  # any scale of the target mass
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().max() < 1e-6
    assert (scores.grad[~support] == 0).all()


def test_kl_loss_without_any_support_is_zero_not_nan():
    scores = torch.randn(1, 3, 4, requires_grad=True)
    loss = indexer_kl_loss(scores, torch.rand(1, 3, 4), torch.zeros(1, 3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(scores.grad).all()


def test_topk_selection_keeps_only_visible_best_entries(build_attention):
    module = build_attention(tiny_model_config(), 1)
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0, 0.5]]]).expand(1, 2, 6).clone()
    visible = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    chosen = module.indexer.select(scores.masked_fill(~visible, float("-inf")), visible)
    assert chosen[0, 0].tolist() == [True, True, False, False, False, False]  # fewer visible than k=4
    assert chosen[0, 1].tolist() == [True, False, True, True, True, False]  # the 4 best


def test_attach_leaves_output_and_injects_scaled_aux_gradient():
    aux_losses.drain()
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    out = w * 1.0
    aux = (w**2).sum()
    attached = aux_losses.attach(out, aux, name="demo")
    assert torch.equal(attached, out)
    try:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
        attached.sum().backward()
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    # d(sum out)/dw = 1, plus 0.5 * d(aux)/dw = 0.5 * 2w
    torch.testing.assert_close(w.grad, torch.tensor([1.0 + 2.0, 1.0 + 3.0]))
    aux_losses.attach(out.detach(), torch.tensor(4.0), name="demo")
    assert aux_losses.pending() == {"demo": 2}
    assert aux_losses.drain() == pytest.approx({"demo": (13.0 + 4.0) / 2})
    assert aux_losses.drain() == {}


def test_attach_rejects_non_scalar_losses():
    with pytest.raises(ValueError, match="scalar"):
        aux_losses.attach(torch.zeros(2), torch.zeros(2), name="bad")


def test_indexer_loss_value_is_recorded_per_csa_layer(build_attention):
    module = build_attention(tiny_model_config(init_std=0.2), 1)
    aux_losses.drain()
    for _ in range(2):
        module(torch.randn(64, 2, 64)).sum().backward()
    values = aux_losses.drain()
    assert set(values) == {"indexer_loss"} and 0 < values["indexer_loss"] < 10
