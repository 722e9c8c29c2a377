"""Muon's per-matrix math against an independently written formula and the V4 update-RMS target."""

import torch

from dsv4_train.train.muon_math import hybrid_newton_schulz, muon_matrix_step
from tests.train.muon_reference import paper_orthogonal_update


def _paper_step(w, g, m, lr, wd):
    m = 0.95 * m + g
    return w * (1 - lr * wd) - lr * paper_orthogonal_update(0.95 * m + g), m


def test_step_matches_paper_formula_fp32():
    # fp64 reference vs fp32 module: 1e-6 absolute on a weight of size ~1, rounding only.
    gen = torch.Generator().manual_seed(0)
    for shape in [(16, 48), (48, 16), (32, 32)]:
        w = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        m = torch.randn(shape, generator=gen)
        ref_w, ref_m = _paper_step(w.double(), g.double(), m.double(), 1e-3, 0.1)
        muon_matrix_step(w, g, m, lr=1e-3, weight_decay=0.1)
        assert torch.allclose(w.double(), ref_w, atol=1e-6, rtol=0), shape
        assert torch.allclose(m.double(), ref_m, atol=1e-6, rtol=0), shape


def test_update_rms_is_018_lr_within_one_percent():
    gen = torch.Generator().manual_seed(1)
    lr = 2e-3
    for shape in [(64, 256), (256, 64), (128, 128)]:
        w = torch.randn(shape, generator=gen)
        before = w.clone()
        muon_matrix_step(w, torch.randn(shape, generator=gen), torch.zeros(shape), lr=lr, weight_decay=0.0)
        rms = (w - before).pow(2).mean().sqrt().item()
        assert abs(rms / (0.18 * lr) - 1) < 0.01, (shape, rms)


def test_bf16_newton_schulz_close_to_fp32():
    # bf16 has ~3 significant digits; 10 iterations keep the result within a few percent.
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    diff = hybrid_newton_schulz(x, dtype=torch.bfloat16) - hybrid_newton_schulz(x)
    assert diff.norm() / hybrid_newton_schulz(x).norm() < 0.05
