"""Learned token-level KV compressor of CSA / HCA layers (paper §2.3), written by hand (V4-only).

One compressed entry per complete block of `ratio` tokens: a per-channel softmax over the block's
gate logits (plus a learned positional bias `ape`) mixes the block's projected values. For ratio 4
(CSA, and the indexer's own compressor) windows overlap: entry i mixes the "own" half of the
projections (channels [c:2c]) of block i with the "previous" half (channels [0:c]) of block i-1
(entry 0 has no previous block: its logits are -inf and values 0). Afterwards every entry is
RMS-normalised and its last `rope_dim` channels are rotated at the position of the block's first
token (spec pitfall §13.6). Trailing tokens that do not fill a block are discarded (training).
Under context parallelism `previous` carries the block before this rank's first token (the previous
rank's last `ratio` rows), so the first local entry of an overlapping compressor mixes it exactly as
the unsplit sequence would.

Numerics follow the official code: projections, gate softmax and the weighted sum run in fp32;
the sum is cast to the input dtype before the RMSNorm. Parameter names match the official
checkpoint (`wkv`, `wgate`, `ape`, `norm`); weights are replicated across tensor-parallel ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv4_train.model.primitives import ReplicatedLinear, RMSNorm, at_least_fp32
from dsv4_train.model.rope import InterleavedRotary, apply_interleaved_rope

OVERLAPPING_RATIO = 4  # the official code keys overlap (and the indexer) on ratio == 4


class Compressor(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        head_dim: int,
        ratio: int,
        rotary: InterleavedRotary,
        eps: float,
        init_method,
        params_dtype: torch.dtype,
    ):
        super().__init__()
        if ratio <= 0:
            raise ValueError(f"Compressor ratio must be > 0, got {ratio}.")
        self.head_dim = head_dim
        self.ratio = ratio
        self.overlap = ratio == OVERLAPPING_RATIO
        self.rotary = rotary
        width = (2 if self.overlap else 1) * head_dim
        self.wkv = ReplicatedLinear(
            hidden_size, width, init_method=init_method, params_dtype=params_dtype, compute_in_fp32=True
        )
        self.wgate = ReplicatedLinear(
            hidden_size, width, init_method=init_method, params_dtype=params_dtype, compute_in_fp32=True
        )
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps=eps)

    def num_entries(self, seq_len: int) -> int:
        return seq_len // self.ratio

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, previous: Optional[torch.Tensor] = None, blocks=None,
        span=None,
    ) -> torch.Tensor:
        """x: [T, B, hidden]; positions: [T] (RoPE positions of the tokens) -> [B, T // ratio, head_dim].

        previous: [ratio, B, hidden] rows right before x (CP halo) or None (x starts the sequence);
        only overlapping compressors read it. blocks: packed documents' `documents.Blocks` (blocks
        restart per document) -> [B, N, head_dim], zero rows where a row has fewer blocks. span:
        under context parallelism (first, begin, end): x holds global rows first.. (halo + this
        rank's rows) and only the blocks ending in [begin, end) are computed (zeros elsewhere).
        """
        if blocks is not None:
            return self._forward_blocks(x, blocks, span)
        seq_len, batch, _ = x.shape
        m, c = self.ratio, self.head_dim
        n = self.num_entries(seq_len)
        if n == 0:
            return x.new_zeros(batch, 0, c)
        usable = x[: n * m]
        # [n*m, B, width] -> [B, n, m, width]
        values = self.wkv(usable).view(n, m, batch, -1).permute(2, 0, 1, 3)
        logits = self.wgate(usable).view(n, m, batch, -1).permute(2, 0, 1, 3) + at_least_fp32(self.ape)
        if self.overlap and previous is not None:
            # Previous-block half moved one block later; block 0 takes it from `previous`.
            first_values = self.wkv(previous).view(1, m, batch, -1).permute(2, 0, 1, 3)[..., :c]
            first_logits = (self.wgate(previous).view(1, m, batch, -1).permute(2, 0, 1, 3) + at_least_fp32(self.ape))[..., :c]
            prev_values = torch.cat((first_values, values[:, :-1, :, :c]), dim=1)
            prev_logits = torch.cat((first_logits, logits[:, :-1, :, :c]), dim=1)
            values = torch.cat((prev_values, values[..., c:]), dim=2)  # [B, n, 2m, c]
            logits = torch.cat((prev_logits, logits[..., c:]), dim=2)
        elif self.overlap:
            # Previous-block half moved one block later; block 0 gets zero values and -inf logits.
            prev_values = F.pad(values[:, :-1, :, :c], (0, 0, 0, 0, 1, 0))
            prev_logits = torch.cat(
                (torch.full_like(logits[:, :1, :, :c], float("-inf")), logits[:, :-1, :, :c]), dim=1
            )
            values = torch.cat((prev_values, values[..., c:]), dim=2)  # [B, n, 2m, c]
            logits = torch.cat((prev_logits, logits[..., c:]), dim=2)
        return self._finish(values, logits, positions[: n * m : m], x.dtype)  # block-start positions

    def _finish(self, values, logits, block_positions, dtype) -> torch.Tensor:
        """Softmax-weighted sum over each block's rows, RMSNorm, RoPE at the block start -> [B, n, c]."""
        compressed = (values * logits.softmax(dim=2)).sum(dim=2)  # [B, n, c], fp32
        compressed = self.norm(compressed.to(dtype))
        cos, sin = self.rotary.cos_sin(block_positions)  # [n, r/2] or [B, n, r/2]
        return apply_interleaved_rope(compressed, cos, sin)

    def _forward_blocks(self, x: torch.Tensor, blocks, span=None) -> torch.Tensor:
        """Document-aligned blocks: each block's rows gathered by index (see documents.Blocks)."""
        batch, c = x.shape[1], self.head_dim
        if blocks.start.shape[1] == 0:
            return x.new_zeros(batch, 0, c)
        rows = torch.arange(batch, device=x.device)[:, None, None]
        index, keep = blocks.token_index, blocks.valid
        if span is not None:  # blocks this rank owns; others (and their indices) are don't-cares
            first, begin, end = span
            index = (index - first).clamp(0, x.shape[0] - 1)
            keep = keep & (blocks.end >= begin) & (blocks.end < end)
        values = self.wkv(x).transpose(0, 1)[rows, index]  # [B, N, m, width]
        logits = self.wgate(x).transpose(0, 1)[rows, index] + at_least_fp32(self.ape)
        if self.overlap:
            # Previous block of the same document, or none (zero values, -inf logits).
            has_previous = blocks.previous[:, :, None, None]
            prev_values = torch.where(has_previous, F.pad(values[:, :-1, :, :c], (0, 0, 0, 0, 1, 0)), 0.0)
            prev_logits = torch.cat((torch.full_like(logits[:, :1, :, :c], float("-inf")), logits[:, :-1, :, :c]), dim=1)
            prev_logits = torch.where(has_previous, prev_logits, float("-inf"))
            values = torch.cat((prev_values, values[..., c:]), dim=2)  # [B, N, 2m, c]
            logits = torch.cat((prev_logits, logits[..., c:]), dim=2)
        compressed = self._finish(values, logits, blocks.position, x.dtype)
        return compressed * keep[..., None].to(compressed.dtype)
