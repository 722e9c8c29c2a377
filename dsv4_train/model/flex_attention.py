"""GPU kernel path of the V4 core attention: torch's FlexAttention with block masks, the sink through the LSE.

One `flex_attention` call covers the window keys and every visible compressed entry (sliding-window
layers, HCA, CSA in the dense / warm-up indexer phases): keys = concat(window KV, compressed
entries), one block mask built from the same visibility rules as `sparse_attention.KeyLayout`.
The single K = V head is shared by all query heads (`enable_gqa` with one KV head). The sink, a
per-head logit with a zero value, is folded in afterwards from the returned log-sum-exp:
out = o * exp(lse) / (exp(lse) + exp(sink)) = o * sigmoid(lse - sink), differentiable through lse.
CSA's sparse phase gathers a different key set per query, which a block mask cannot express: it
uses the gather-based `sparse_attention.blockwise_attention`.

On CUDA the call is compiled (a fused kernel: no T x T scores). torch has no FlexAttention backward
on CPU; the CPU tests run torch's own unfused reference implementation of the same operator.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from dsv4_train.model.sparse_attention import KeyLayout

FLEX_BLOCK = 128


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


@functools.lru_cache(maxsize=64)
def block_mask(layout: KeyLayout, seq_len: int, num_window_keys: int, num_entries: int, device: torch.device):
    """Block mask over keys [window KV (num_window_keys) | compressed entries (num_entries)]."""
    from torch.nn.attention.flex_attention import create_block_mask

    window, halo, offset, ratio = layout.window, layout.halo, layout.offset, max(layout.ratio, 1)

    def visible(batch, head, q_idx, kv_idx):
        query = q_idx + offset
        key = kv_idx - halo + offset  # global position of a window key
        distance = query - key
        in_window = (kv_idx < num_window_keys) & (distance >= 0) & (distance < window) & (key >= 0)
        entry = kv_idx - num_window_keys
        in_entries = (kv_idx >= num_window_keys) & (entry < (query + 1) // ratio)
        return in_window | in_entries

    return create_block_mask(
        visible,
        None,
        None,
        seq_len,
        num_window_keys + num_entries,
        device=device,
        BLOCK_SIZE=FLEX_BLOCK,
        _compile=device.type == "cuda",
    )


def document_block_mask(layout: KeyLayout, batch: int, seq_len: int, num_window_keys: int, num_entries: int, device):
    """Per-row block mask for packed documents (window and entries within the query's document)."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = layout.documents
    segment = docs.documents.segment_ids  # [B, S] (global indices, like layout.offset)
    window, halo, offset = layout.window, layout.halo, layout.offset
    if docs.blocks is not None and num_entries:
        entry_segment = torch.where(docs.blocks.valid, docs.blocks.segment, -1)[:, :num_entries]
        entry_end = docs.blocks.end[:, :num_entries]
    else:  # no entries: one never-visible placeholder keeps the indexing valid
        entry_segment = torch.full((batch, 1), -1, device=device, dtype=torch.long)
        entry_end = torch.zeros((batch, 1), device=device, dtype=torch.long)

    def visible(b, head, q_idx, kv_idx):
        query = q_idx + offset
        key = kv_idx - halo + offset  # global position of a window key
        distance = query - key
        in_window = (kv_idx < num_window_keys) & (distance >= 0) & (distance < window) & (key >= 0)
        in_window = in_window & (segment[b, query] == segment[b, key.clamp(min=0, max=segment.shape[1] - 1)])
        entry = (kv_idx - num_window_keys).clamp(min=0, max=entry_segment.shape[1] - 1)
        in_entries = (kv_idx >= num_window_keys) & (entry_segment[b, entry] == segment[b, query])
        in_entries = in_entries & (entry_end[b, entry] <= query)
        return in_window | in_entries

    return create_block_mask(
        visible, batch, None, seq_len, num_window_keys + num_entries, device=device, BLOCK_SIZE=FLEX_BLOCK,
        _compile=device.type == "cuda",
    )


def flex_joint_attention(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    compressed: Optional[torch.Tensor],
    sink: torch.Tensor,
    scale: float,
    layout: KeyLayout,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sparse_attention.blockwise_attention` without top-k: (out, lse incl. sink)."""
    batch, heads, seq_len, dim = q.shape
    keys = window_kv if compressed is None else torch.cat((window_kv, compressed.to(window_kv.dtype)), dim=1)
    num_entries = 0 if compressed is None else compressed.shape[1]
    if layout.documents is not None:
        mask = document_block_mask(layout, batch, seq_len, window_kv.shape[1], num_entries, q.device)
    else:
        mask = block_mask(layout, seq_len, window_kv.shape[1], num_entries, q.device)
    keys = keys.unsqueeze(1)  # [B, 1, L, c]: one KV head
    kernel = _kernel(q.device.type)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older keyword
        out, lse = kernel(q, keys, keys, block_mask=mask, scale=scale, enable_gqa=True, return_lse=True)
    else:
        out, aux = kernel(q, keys, keys, block_mask=mask, scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True))
        lse = aux.lse  # [B, H, T] fp32, natural log
    sink_logit = sink.float().view(1, heads, 1)
    out = (out.float() * torch.sigmoid(lse - sink_logit).unsqueeze(-1)).to(q.dtype)
    return out, torch.logaddexp(lse, sink_logit).detach()
