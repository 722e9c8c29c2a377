"""Interleaved RoPE + per-layer YaRN tables (paper §2.3)."""

import math

import pytest
import torch

from conftest import tiny_model_config
from dsv4_train.config.model import YarnConfig
from dsv4_train.model.rope import InterleavedRotary, apply_interleaved_rope, layer_rotary, rope_inv_freq

FLASH_YARN = YarnConfig(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0)


def test_flash_yarn_ramp_matches_spec_numbers():
    # Spec §8: base 160000, r=64, L0=65536, beta 32/1, factor 16 -> low=15, high=25: pairs 0..15 keep
    # their frequency, pairs >= 25 are divided by 16, linear blend between.
    base = 160000.0
    plain = 1.0 / base ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    yarn = rope_inv_freq(rope_dim=64, base=base, yarn=FLASH_YARN)
    torch.testing.assert_close(yarn[:16], plain[:16], rtol=0, atol=0)
    torch.testing.assert_close(yarn[25:], plain[25:] / 16, rtol=1e-6, atol=0)
    blend = 1 - (torch.arange(16, 25, dtype=torch.float32) - 15) / 10  # weight of the original freq
    torch.testing.assert_close(yarn[16:25], plain[16:25] * blend + plain[16:25] / 16 * (1 - blend), rtol=1e-6, atol=0)


@pytest.mark.parametrize("yarn", [None, FLASH_YARN, YarnConfig(4.0, 32, 32.0, 1.0)])
def test_frequencies_match_transformers(yarn):
    """transformers' YaRN/default inverse frequencies (the same formula, written independently)."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    rope_parameters = None
    if yarn is not None:
        rope_parameters = {
            "rope_type": "yarn",
            "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
        }
    hf_cfg = DeepseekV4Config(num_hidden_layers=2, rope_parameters=rope_parameters)
    hf = DeepseekV4RotaryEmbedding(hf_cfg)
    ours = rope_inv_freq(rope_dim=64, base=160000.0, yarn=yarn)
    # Same fp32 formula; 1e-6 relative covers pow/exp rounding differences.
    torch.testing.assert_close(ours, hf.compress_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope_inv_freq(rope_dim=64, base=10000.0, yarn=None), hf.main_inv_freq, rtol=1e-6, atol=0)


def test_layer_tables_follow_the_compress_ratio():
    cfg = tiny_model_config()
    for index, ratio in enumerate(cfg.compress_ratios):
        rotary = layer_rotary(cfg, index)
        if ratio > 0:
            assert rotary.base == cfg.compress_rope_theta and rotary.yarn == cfg.yarn
        else:  # ratio-0 layers and the MTP block: plain rope_theta, no YaRN
            assert rotary.base == cfg.rope_theta and rotary.yarn is None
    # tiny's YaRN (r=8, L0=32) really changes frequencies: pair 0 kept, pairs 1..3 divided by 4.
    plain = rope_inv_freq(rope_dim=8, base=cfg.compress_rope_theta, yarn=None)
    scaled = layer_rotary(cfg, 1).inv_freq(torch.device("cpu"))
    torch.testing.assert_close(scaled, torch.cat((plain[:1], plain[1:] / 4)), rtol=1e-6, atol=0)


def test_interleaved_pairs_rotate_as_complex_numbers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=gen)  # 4 pass-through channels + 8 rotated
    rotary = InterleavedRotary(rope_dim=8, base=10000.0, yarn=None)
    positions = torch.arange(5) * 7
    cos, sin = rotary.cos_sin(positions)
    y = apply_interleaved_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(y[..., :4], x[..., :4], rtol=0, atol=0)
    as_complex = torch.view_as_complex(x[..., 4:].unflatten(-1, (-1, 2)).contiguous())
    angles = positions[:, None].float() * rotary.inv_freq(torch.device("cpu"))
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    torch.testing.assert_close(y[..., 4:], expected, rtol=1e-6, atol=1e-6)  # fp32 rounding only
    # The inverse rotation undoes the forward one at the same positions.
    back = apply_interleaved_rope(y, cos[:, None], sin[:, None], inverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def test_rotated_dot_products_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    rotary = InterleavedRotary(rope_dim=8, base=160000.0, yarn=YarnConfig(4.0, 32, 32.0, 1.0))

    def score(pq, pk):
        cq, sq = rotary.cos_sin(torch.tensor([pq]))
        ck, sk = rotary.cos_sin(torch.tensor([pk]))
        return (apply_interleaved_rope(q[None], cq, sq) * apply_interleaved_rope(k[None], ck, sk)).sum()

    # fp32 angles at positions ~1000 carry ~1e-4 rad error; 1e-4 relative tolerance.
    ref = score(10, 3)
    for offset in (1, 16, 1000):
        assert math.isclose(score(10 + offset, 3 + offset), ref, rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(score(11, 3), ref, rel_tol=1e-2)


def test_odd_rope_dim_is_rejected():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        rope_inv_freq(rope_dim=7, base=10000.0, yarn=None)


@pytest.mark.parametrize("layout", ["odd_offset", "transposed", "bf16"])
def test_rotation_handles_any_layout(layout):
    """Any input layout (odd offset of the rotated channels, strided, bf16) gives exactly the
    textbook result (re*cos - im*sin, re*sin + im*cos): bitwise in fp32 (the implementation
    performs the same IEEE products and sums), one rounding to bf16 otherwise."""
    gen = torch.Generator().manual_seed(2)
    pass_through = 5 if layout == "odd_offset" else 4  # 5: the rotated channels start at an odd offset
    x = torch.randn(6, 3, pass_through + 8, generator=gen)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # [6, 3, c] with non-contiguous strides
    if layout == "bf16":
        x = x.bfloat16()
    rotary = InterleavedRotary(rope_dim=8, base=10000.0, yarn=None)
    cos, sin = rotary.cos_sin(torch.arange(6) * 5)
    y = apply_interleaved_rope(x, cos[:, None], sin[:, None])
    pairs = x[..., pass_through:].float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None], sin[:, None]
    expected = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y[..., :pass_through], x[..., :pass_through], rtol=0, atol=0)
    tol = 0.0 if x.dtype == torch.float32 else 1e-2  # bitwise in fp32 / one bf16 rounding
    torch.testing.assert_close(y[..., pass_through:].float(), expected.float(), rtol=tol, atol=tol)
