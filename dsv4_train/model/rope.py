"""Interleaved partial RoPE with per-layer YaRN tables (paper §2.3).

V4 rotates the **last** `qk_rope_head_dim` channels of queries, window KV, compressed KV and indexer
queries/keys, pairing channels (2i, 2i+1) as one complex number (the interleaved convention the
released checkpoints use; Megatron-Core's RoPE is rotate-half, hence this module). The attention
output is de-rotated with the conjugate rotation at the query position.

Per-layer table (paper §2.3): a layer with compress ratio 0 (including the MTP block,
whose ratio entry is 0) uses `rope_theta` without YaRN; a layer with ratio > 0 uses
`compress_rope_theta` with YaRN for *all* of its rotations (window branch, compressor, indexer).
No YaRN attention temperature (mscale) is applied anywhere.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from dsv4_train.config.model import ModelConfig, YarnConfig
from dsv4_train.model.primitives import at_least_fp32


def rope_inv_freq(*, rope_dim: int, base: float, yarn: Optional[YarnConfig]) -> torch.Tensor:
    """Per-pair angular frequencies [rope_dim // 2] (fp32), YaRN-blended when `yarn` is given.

    YaRN as in the official `precompute_freqs_cis`: pairs below the `beta_fast` correction dim keep
    their frequency, pairs above the `beta_slow` one are divided by `factor`, linear blend between.
    """
    if rope_dim % 2:
        raise ValueError(f"qk_rope_head_dim={rope_dim} must be even (RoPE rotates channel pairs).")
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None or yarn.original_max_position_embeddings <= 0:
        return freqs

    def correction_dim(num_rotations: float) -> float:
        return (
            rope_dim
            * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = original frequency, 0 = interpolated (divided by factor)
    return freqs / yarn.factor * (1.0 - keep) + freqs * keep


class InterleavedRotary:
    """One layer's RoPE table: cos/sin for arbitrary integer positions (no learnable state).

    The frequencies are kept outside the module tree on purpose: casting a model to bf16 must not
    round them, and they are a pure function of the config.
    """

    def __init__(self, *, rope_dim: int, base: float, yarn: Optional[YarnConfig]):
        self.rope_dim = rope_dim
        self.base = base
        self.yarn = yarn
        self._inv_freq_cpu = rope_inv_freq(rope_dim=rope_dim, base=base, yarn=yarn)
        self._inv_freq_by_device: Dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        cached = self._inv_freq_by_device.get(device)
        if cached is None:
            cached = self._inv_freq_cpu.to(device)
            self._inv_freq_by_device[device] = cached
        return cached

    def cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions: integer tensor [...] -> (cos, sin), each [..., rope_dim // 2] in fp32."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq(positions.device)
        return angles.cos(), angles.sin()

    def __repr__(self) -> str:
        return f"InterleavedRotary(rope_dim={self.rope_dim}, base={self.base}, yarn={self.yarn is not None})"


def layer_rotary(model_cfg: ModelConfig, layer_index: int) -> InterleavedRotary:
    """The RoPE table of main layer / MTP layer `layer_index` (index into `compress_ratios`)."""
    ratio = model_cfg.compress_ratios[layer_index]
    if ratio > 0:
        return InterleavedRotary(
            rope_dim=model_cfg.qk_rope_head_dim, base=model_cfg.compress_rope_theta, yarn=model_cfg.yarn
        )
    return InterleavedRotary(rope_dim=model_cfg.qk_rope_head_dim, base=model_cfg.rope_theta, yarn=None)


def rope_tables(rotary: "InterleavedRotary", positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) laid out for [T, B, ...] activations: [T, 1, r/2] from positions [T] shared by the
    batch, [T, B, r/2] from per-row positions [B, T] (packed documents restart RoPE)."""
    cos, sin = rotary.cos_sin(positions)
    if positions.dim() == 1:
        return cos[:, None], sin[:, None]
    return cos.transpose(0, 1), sin.transpose(0, 1)


def apply_interleaved_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False
) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] channels of x by interleaved RoPE; other channels pass through.

    cos/sin: [..., rope_dim // 2] broadcastable against x[..., :rope_dim // 2]. `inverse=True`
    applies the conjugate rotation (undoes a forward rotation at the same positions). The rotation
    is computed in fp32 and cast back to x.dtype (as the official code does).
    """
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    # pair (re, im) -> (re*cos - im*sin, re*sin + im*cos) as pairs * [cos, cos] + swapped pairs *
    # [-sin, sin]: the same IEEE products and sums as the textbook form (x*(-s) == -(x*s) and
    # a + (-b) == a - b exactly), so bit-identical to it and to transformers' rotate_half form, in
    # ~half the ops. (A complex multiply is cheaper still but rounds differently.)
    neg_sin = -sin
    cos_pair = torch.stack((cos, cos), dim=-1)
    sin_pair = torch.stack((sin, neg_sin), dim=-1) if inverse else torch.stack((neg_sin, sin), dim=-1)
    pairs = at_least_fp32(rope).unflatten(-1, (-1, 2))
    rotated = pairs * cos_pair + pairs.flip(-1) * sin_pair
    return torch.cat((nope, rotated.flatten(-2).to(x.dtype)), dim=-1)
