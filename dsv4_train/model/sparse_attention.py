"""Exact V4 core attention at linear memory: query blocks, gathered top-k entries, recomputing backward.

The dense reference (`attention.joint_softmax_attention`) builds a [B, H, T, T + N] score tensor and
keeps it for backward. Here queries are processed in blocks of `block_size`; each block touches only
the keys it may see:

* window keys: the `window` tokens up to each query (its span of `window_kv`),
* compressed entries, either all entries visible to the block (HCA; CSA dense/warm-up phases) or,
  with `topk` indices, the top-k entries chosen for each query (CSA sparse phase), gathered,

with ONE softmax per query over both parts plus the per-head sink logit (zero value), as the paper's
sparse attention does. Forward keeps only q, the keys, the output and the log-sum-exp (and the
top-k indices); backward recomputes each block's probabilities from the log-sum-exp (the
FlashAttention recipe, in plain torch), so nothing of size T x T or T x N x heads outlives a block.
Written by hand: neither torch nor Megatron-Core has attention with a sink, a sliding window and
per-query gathered keys in one softmax.

Shapes: q [B, H, T, c]; window_kv [B, halo + T, c] (K = V, one head shared by all query heads);
compressed [B, N, c]; topk [B, T, k] entry indices (int32, -1 = no entry). Index arithmetic uses
global sequence positions (`KeyLayout`), so a context-parallel slice sees exactly its keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from dsv4_train.model.blocking import attention_block_elements, auto_block_size
from dsv4_train.model.primitives import at_least_fp32

NEG_INF = float("-inf")


@dataclass(eq=False)
class DocumentMasks:
    """Packed documents of the micro-batch as the masks need them (compared by identity)."""

    documents: object  # model.documents.Documents
    blocks: object  # model.documents.Blocks of this layer's ratio, or None
    prefix: list  # per query t: entries any row's query <= t may see (Blocks.visible_prefix)

    @staticmethod
    def of(documents, blocks) -> "DocumentMasks":
        seq_len = documents.segment_ids.shape[1]
        return DocumentMasks(documents, blocks, blocks.visible_prefix(seq_len) if blocks is not None else [])


@dataclass(frozen=True)
class KeyLayout:
    """Where this rank's queries and keys sit in the sequence.

    window: keys per query in the sliding window (the query included); halo: window keys before the
    first query (context parallel); offset: global position of the first query; ratio: compression
    ratio of the entries (0: none). Query t (local) sees window key j (index into window_kv) iff
    0 <= (t + halo) - j < window and j's global position offset - halo + j >= 0, and compressed entry
    s iff s < (offset + t + 1) // ratio (its block is complete).
    """

    window: int
    halo: int = 0
    offset: int = 0
    ratio: int = 0
    documents: Optional[DocumentMasks] = None  # packed documents (global indices, like offset)

    @property
    def blocks(self):
        return self.documents.blocks if self.documents is not None else None

    def window_span(self, t0: int, t1: int) -> Tuple[int, int]:
        """[j0, j1) of window_kv that queries t0..t1-1 may see."""
        return max(0, t0 + self.halo - self.window + 1, self.halo - self.offset), t1 + self.halo

    def window_allowed(self, t0: int, t1: int, device) -> torch.Tensor:
        """Bool [t1 - t0, j1 - j0] for the span of `window_span`."""
        j0, j1 = self.window_span(t0, t1)
        t = torch.arange(t0, t1, device=device) + self.halo
        distance = t[:, None] - torch.arange(j0, j1, device=device)[None, :]
        allowed = (distance >= 0) & (distance < self.window)
        if self.documents is not None:  # [B, b, L]: and within one document (global indices)
            shift = self.offset - self.halo
            rows = torch.arange(t0, t1, device=device) + self.offset
            allowed = allowed & self.documents.documents.same_document_at(rows, torch.arange(j0, j1, device=device) + shift)
        return allowed

    def entries_visible(self, t1: int, num_entries: int) -> int:
        """Number of leading compressed entries any of the queries before t1 may see."""
        if not self.ratio or t1 <= 0:
            return 0
        if self.documents is not None:
            return min(num_entries, self.documents.prefix[self.offset + t1 - 1])
        return min(num_entries, (self.offset + t1) // self.ratio)

    def entries_allowed(self, t0: int, t1: int, count: int, device) -> torch.Tensor:
        """Bool [t1 - t0, count] (or [B, t1 - t0, count] with documents): entry s visible to query t."""
        if self.documents is not None:
            rows = slice(self.offset + t0, self.offset + t1)
            return self.documents.blocks.visible(self.documents.documents, rows, count)
        limit = (torch.arange(t0, t1, device=device) + self.offset + 1) // self.ratio
        return torch.arange(count, device=device)[None, :] < limit[:, None]


def gather_entries(entries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """entries [B, N, c], indices [B, q, k] (-1 allowed, read as 0) -> [B, q, k, c]."""
    batch, num, dim = entries.shape
    flat = indices.long().clamp_min(0) + (torch.arange(batch, device=entries.device) * num).view(batch, 1, 1)
    return entries.reshape(batch * num, dim)[flat]


def _block_scores(q_blk, window_keys, window_ok, entry_keys, entry_ok, scale):
    """Scaled scores of one query block in fp32 (fp64 for fp64 inputs), invisible keys at -inf.

    q_blk [B, H, b, c]; window_keys [B, L, c]; entry_keys [B, n, c] (shared) or [B, b, k, c]
    (gathered per query) or None; *_ok bool masks broadcastable to the scores.
    Returns (window [B, H, b, L], entries [B, H, b, n|k] or None).
    """
    batch, heads, rows, dim = q_blk.shape
    flat_q = q_blk.reshape(batch, heads * rows, dim)
    window = at_least_fp32(torch.bmm(flat_q, window_keys.transpose(1, 2)).view(batch, heads, rows, -1))
    window = window.mul_(scale).masked_fill_(~window_ok, NEG_INF)
    if entry_keys is None:
        return window, None
    if entry_keys.dim() == 3:
        entries = torch.bmm(flat_q, entry_keys.transpose(1, 2)).view(batch, heads, rows, -1)
    else:  # [B, b, H, c] @ [B, b, c, k] -> [B, b, H, k]
        entries = torch.matmul(q_blk.transpose(1, 2), entry_keys.transpose(2, 3)).transpose(1, 2)
    entries = at_least_fp32(entries).mul_(scale).masked_fill_(~entry_ok, NEG_INF)
    return window, entries


def _over_heads(mask: torch.Tensor) -> torch.Tensor:
    """[b, L] stays (broadcasts over B and H); per-row [B, b, L] -> [B, 1, b, L]."""
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


class _BlockContext:
    """Keys and masks of one query block (shared by forward and backward so both see the same)."""

    def __init__(self, layout: KeyLayout, t0, t1, window_kv, compressed, topk):
        device = window_kv.device
        j0, j1 = layout.window_span(t0, t1)
        self.window_span = (j0, j1)
        self.window_keys = window_kv[:, j0:j1]
        self.window_ok = _over_heads(layout.window_allowed(t0, t1, device))
        self.entry_keys = self.entry_ok = self.entry_index = None
        self.visible = 0
        if compressed is None:
            return
        if topk is None:
            self.visible = layout.entries_visible(t1, compressed.shape[1])
            self.entry_keys = compressed[:, : self.visible]
            self.entry_ok = _over_heads(layout.entries_allowed(t0, t1, self.visible, device))
        else:
            self.entry_index = topk[:, t0:t1]  # [B, b, k]
            self.entry_keys = gather_entries(compressed, self.entry_index)  # [B, b, k, c]
            self.entry_ok = (self.entry_index >= 0).unsqueeze(1)  # [B, 1, b, k]

    def scores(self, q_blk, scale):
        return _block_scores(q_blk, self.window_keys, self.window_ok, self.entry_keys, self.entry_ok, scale)


def _apply_values(probs_window, probs_entries, ctx: _BlockContext, dtype) -> torch.Tensor:
    """sum_j p_j v_j over the block's keys -> [B, H, b, c] in `dtype`, accumulated in the
    probabilities' dtype (fp32, or fp64 for fp64 inputs): probabilities and values are not rounded
    to a bf16 input dtype first, and window and entry parts are summed before the one rounding."""
    batch, heads, rows, keys = probs_window.shape
    acc = probs_window.dtype
    out = torch.bmm(probs_window.reshape(batch, heads * rows, keys), ctx.window_keys.to(acc))
    out = out.view(batch, heads, rows, -1)
    if probs_entries is not None and ctx.entry_keys.dim() == 3:
        width = probs_entries.shape[-1]
        extra = torch.bmm(probs_entries.reshape(batch, heads * rows, width), ctx.entry_keys.to(acc))
        out = out + extra.view(batch, heads, rows, -1)
    elif probs_entries is not None:  # [B, b, H, k] @ [B, b, k, c] -> [B, b, H, c]
        out = out + torch.matmul(probs_entries.transpose(1, 2), ctx.entry_keys.to(acc)).transpose(1, 2)
    return out.to(dtype)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, window_kv, compressed, sink, topk, layout: KeyLayout, scale: float, block: int):
        batch, heads, seq_len, dim = q.shape
        out = q.new_empty(batch, heads, seq_len, dim)
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32, fp64 stays fp64
        lse = torch.empty(batch, heads, seq_len, dtype=acc, device=q.device)
        sink_logit = sink.to(acc).view(1, heads, 1)
        for t0 in range(0, seq_len, block):
            t1 = min(seq_len, t0 + block)
            keys = _BlockContext(layout, t0, t1, window_kv, compressed, topk)
            window, entries = keys.scores(q[:, :, t0:t1], scale)
            peak = torch.maximum(window.amax(-1), sink_logit)  # the window always holds the query
            if entries is not None and entries.shape[-1]:
                peak = torch.maximum(peak, entries.amax(-1))
            # As torch.softmax does: exp(x - max) / sum (the sink joins the sum); the backward
            # rebuilds the same probabilities from the log-sum-exp.
            window = torch.exp(window - peak.unsqueeze(-1))
            total = window.sum(-1) + torch.exp(sink_logit - peak)
            if entries is not None:
                entries = torch.exp(entries - peak.unsqueeze(-1))
                total = total + entries.sum(-1)
            block_lse = peak + torch.log(total)  # [B, H, b]
            probs_window = window / total.unsqueeze(-1)
            probs_entries = None if entries is None else entries / total.unsqueeze(-1)
            out[:, :, t0:t1] = _apply_values(probs_window, probs_entries, keys, window_kv.dtype)
            lse[:, :, t0:t1] = block_lse
        ctx.save_for_backward(q, window_kv, compressed, sink, topk, out, lse)
        ctx.layout, ctx.scale, ctx.block = layout, scale, block
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, window_kv, compressed, sink, topk, out, lse = ctx.saved_tensors
        layout, scale, block = ctx.layout, ctx.scale, ctx.block
        batch, heads, seq_len, dim = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_out = grad_out.to(acc)
        # D_t = sum_j p_j dP_j = dO . O (the sink has a zero value, so it adds nothing).
        delta = (grad_out * out.to(acc)).sum(-1)  # [B, H, T]
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_window = torch.zeros(window_kv.shape, dtype=acc, device=q.device)
        grad_entries = None if compressed is None else torch.zeros(compressed.shape, dtype=acc, device=q.device)
        sink_logit = sink.to(acc).view(1, heads, 1)
        grad_sink = torch.zeros(heads, dtype=acc, device=q.device)
        for t0 in range(0, seq_len, block):
            t1 = min(seq_len, t0 + block)
            rows = t1 - t0
            keys = _BlockContext(layout, t0, t1, window_kv, compressed, topk)
            q_blk = q[:, :, t0:t1]
            window, entries = keys.scores(q_blk, scale)
            block_lse = lse[:, :, t0:t1].unsqueeze(-1)
            d_out = grad_out[:, :, t0:t1]  # [B, H, b, c]
            d_delta = delta[:, :, t0:t1].unsqueeze(-1)
            flat_dout = d_out.reshape(batch, heads * rows, dim)
            flat_q = q_blk.to(acc).reshape(batch, heads * rows, dim)
            # The sink's logit gets -p_sink D (its value is zero).
            grad_sink -= (torch.exp(sink_logit - block_lse.squeeze(-1)) * d_delta.squeeze(-1)).sum((0, 2))

            # Window keys: dS = P (dP - D); dq = scale dS K; dK = scale dS^T q + P^T dO (K = V).
            probs = torch.exp(window - block_lse)
            wkeys = keys.window_keys.to(acc)
            d_scores = probs * (torch.bmm(flat_dout, wkeys.transpose(1, 2)).view_as(probs) - d_delta)
            flat_ds = d_scores.view(batch, heads * rows, -1)
            flat_p = probs.view(batch, heads * rows, -1)
            grad_q_blk = torch.bmm(flat_ds, wkeys).mul_(scale)
            j0, j1 = keys.window_span
            grad_window[:, j0:j1] += torch.bmm(flat_ds.transpose(1, 2), flat_q).mul_(scale) + torch.bmm(
                flat_p.transpose(1, 2), flat_dout
            )
            if entries is not None:
                probs = torch.exp(entries - block_lse)
                ekeys = keys.entry_keys.to(acc)
                if ekeys.dim() == 3:  # shared prefix of visible entries
                    d_scores = probs * (torch.bmm(flat_dout, ekeys.transpose(1, 2)).view_as(probs) - d_delta)
                    flat_ds = d_scores.view(batch, heads * rows, -1)
                    grad_q_blk += torch.bmm(flat_ds, ekeys).mul_(scale)
                    grad_entries[:, : keys.visible] += torch.bmm(flat_ds.transpose(1, 2), flat_q).mul_(
                        scale
                    ) + torch.bmm(probs.view(batch, heads * rows, -1).transpose(1, 2), flat_dout)
                else:  # gathered per query: [B, b, H, *] layouts
                    d_out_q = d_out.transpose(1, 2)  # [B, b, H, c]
                    probs_q = probs.transpose(1, 2)  # [B, b, H, k]
                    d_p = torch.matmul(d_out_q, ekeys.transpose(2, 3))  # [B, b, H, k]
                    d_scores = probs_q * (d_p - d_delta.transpose(1, 2))
                    grad_q_blk += torch.matmul(d_scores, ekeys).mul_(scale).transpose(1, 2).reshape(
                        batch, heads * rows, dim
                    )
                    per_entry = torch.matmul(d_scores.transpose(2, 3), q_blk.to(acc).transpose(1, 2)).mul_(
                        scale
                    ) + torch.matmul(probs_q.transpose(2, 3), d_out_q)  # [B, b, k, c]
                    index = keys.entry_index.long().clamp_min(0)
                    index = index + (torch.arange(batch, device=q.device) * compressed.shape[1]).view(batch, 1, 1)
                    # Invalid slots have zero probability, hence add zeros to entry 0.
                    grad_entries.view(-1, dim).index_add_(0, index.reshape(-1), per_entry.reshape(-1, dim))
            grad_q[:, :, t0:t1] = grad_q_blk.view(batch, heads, rows, dim)
        return (
            grad_q.to(q.dtype),
            grad_window.to(window_kv.dtype),
            None if grad_entries is None else grad_entries.to(compressed.dtype),
            grad_sink.to(sink.dtype),
            None,
            None,
            None,
            None,
        )


def blockwise_attention(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    compressed: Optional[torch.Tensor],
    sink: torch.Tensor,
    scale: float,
    layout: KeyLayout,
    *,
    topk: Optional[torch.Tensor] = None,
    block_size: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact joint-softmax attention (window + compressed entries + sink), linear memory.

    Returns (out [B, H, T, c] in q.dtype, lse [B, H, T] fp32 (fp64 for fp64 q), the log of each query's softmax
    denominator including the sink, not differentiable). `block_size` 0 = automatic.
    """
    batch, heads, seq_len, _ = q.shape
    if compressed is not None and compressed.shape[1] == 0:
        compressed, topk = None, None
    if block_size <= 0:
        entries = gathered = 0
        if compressed is not None and topk is not None:
            gathered = topk.shape[-1]
        elif compressed is not None:
            entries = layout.entries_visible(seq_len, compressed.shape[1])
        block_size = auto_block_size(
            functools.partial(
                attention_block_elements, batch=batch, heads=heads, window=layout.window, entries=entries,
                gathered=gathered, dim=q.shape[-1],
            )
        )
    return _BlockSparseAttention.apply(q, window_kv, compressed, sink, topk, layout, scale, block_size)
