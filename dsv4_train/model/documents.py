"""Packed documents of a micro-batch: who may see whom, where RoPE restarts, what gets compressed.

V4 is pre-trained on packed samples with sample-level attention masking (paper §3.4.3): each
document attends only to itself and is compressed on its own. Given `segment_ids` [B, T] (equal ids
= one document, non-decreasing along each row), a query sees

* a window key iff both are in one document and the key is among the `window` latest tokens;
* a compressed entry iff the entry's block lies in the query's document and is complete.

Compression blocks restart at every document's first token (block i of a document covers its tokens
[i*m, (i+1)*m)); a document's trailing tokens that do not fill a block are not compressed, exactly as
at the end of a sequence. The overlapping (ratio 4) compressors mix a block with the previous block
of the SAME document; a document's first block has none (like the sequence's first block).

RoPE positions restart at 0 in every document (the paper is silent): then every document is
computed exactly as if it were alone, which is what sample-level masking is for, and positions never
exceed the longest document (the regime YaRN was fitted for).

Written by hand (V4-only). Shapes: B batch rows, T tokens, N = the most blocks any row has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass
class Documents:
    """Documents of the whole sequence [B, S]; under context parallelism this rank's queries are
    rows offset .. offset + local_len - 1 (every index here is a global sequence index)."""

    segment_ids: torch.Tensor  # [B, S] int64
    positions: torch.Tensor  # [B, S] int64, position inside the document (RoPE)
    offset: int = 0
    local_len: int = -1  # -1: the whole sequence

    @property
    def local(self) -> slice:
        return slice(self.offset, self.offset + (self.local_len if self.local_len >= 0 else self.segment_ids.shape[1]))

    def halo_positions(self, halo: int) -> torch.Tensor:
        """[B, halo] RoPE positions of the rows before this rank's (zeros before the sequence start)."""
        start = self.offset - halo
        if start >= 0:
            return self.positions[:, start : self.offset]
        pad = self.positions.new_zeros(self.positions.shape[0], -start)
        return torch.cat((pad, self.positions[:, : self.offset]), dim=1)

    def same_document_at(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Bool [B, len(rows), len(keys)] for global row / key indices (keys < 0: never)."""
        same = self.segment_ids[:, rows, None] == self.segment_ids[:, None, keys.clamp(min=0)]
        return same & (keys >= 0)[None, None, :]

    @staticmethod
    def from_segment_ids(segment_ids: torch.Tensor, *, offset: int = 0, local_len: int = -1) -> "Documents":
        if segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be [batch, seq] integers; got shape {tuple(segment_ids.shape)}.")
        segment_ids = segment_ids.long()
        if segment_ids.shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
            raise ValueError("segment_ids must be non-decreasing along the sequence (one run of ids per document).")
        seq = segment_ids.shape[1]
        index = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        # First token of each token's document: running max of the start indices.
        doc_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return Documents(segment_ids=segment_ids, positions=index - doc_start, offset=offset, local_len=local_len)

    def blocks(self, ratio: int) -> "Blocks":
        """The compression blocks of every row (cached per ratio)."""
        cache: Dict[int, Blocks] = self.__dict__.setdefault("_blocks", {})
        if ratio not in cache:
            cache[ratio] = Blocks.of(self, ratio)
        return cache[ratio]


@dataclass
class Blocks:
    """Complete compression blocks of ratio m per row, in sequence order, padded to N.

    start [B, N] first token, valid [B, N], segment [B, N] document id, position [B, N] RoPE position
    of the first token, previous [B, N] bool: the previous entry is the block before it in the same
    document (overlapping compressors), token_index [B, N, m] the block's tokens (0 where invalid).
    """

    ratio: int
    start: torch.Tensor
    valid: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    previous: torch.Tensor
    token_index: torch.Tensor

    @staticmethod
    def of(docs: Documents, ratio: int) -> "Blocks":
        seg, pos = docs.segment_ids, docs.positions
        batch, seq = seg.shape
        # A block starting at t ends at t + m - 1, inside the sequence and the same document.
        ends_in_doc = torch.zeros_like(seg, dtype=torch.bool)
        if seq >= ratio:
            ends_in_doc[:, : seq - ratio + 1] = seg[:, ratio - 1 :] == seg[:, : seq - ratio + 1]
        is_start = (pos % ratio == 0) & ends_in_doc
        counts = is_start.sum(1)
        num = int(counts.max()) if batch else 0
        # Block starts in order, padded: sort start flags first (stable keeps sequence order).
        order = torch.sort((~is_start).to(torch.int8), dim=1, stable=True).indices[:, :num]
        valid = torch.arange(num, device=seg.device)[None, :] < counts[:, None]
        start = torch.where(valid, order, torch.zeros_like(order))
        segment = torch.gather(seg, 1, start)
        previous = torch.zeros_like(valid)
        if num > 1:
            previous[:, 1:] = valid[:, 1:] & (segment[:, 1:] == segment[:, :-1])
        return Blocks(
            ratio=ratio, start=start, valid=valid, segment=segment, position=torch.gather(pos, 1, start),
            previous=previous,
            token_index=start[..., None] + torch.arange(ratio, device=seg.device) * valid[..., None],
        )

    @property
    def end(self) -> torch.Tensor:
        """[B, N] last token of each block."""
        return self.start + self.ratio - 1

    def visible(self, docs: Documents, rows: slice, count: int) -> torch.Tensor:
        """Bool [B, len(rows), count]: query t sees entry s (same document, block complete at t)."""
        t = torch.arange(docs.segment_ids.shape[1], device=self.start.device)[rows]
        end, valid, segment = self.end[:, :count], self.valid[:, :count], self.segment[:, :count]
        same = docs.segment_ids[:, rows, None] == segment[:, None, :]
        return valid[:, None, :] & same & (end[:, None, :] <= t[None, :, None])

    def visible_prefix(self, seq: int) -> list:
        """Python list [T]: how many leading entries the queries up to t may see at most (max over
        rows; entries are in sequence order, so every entry a query sees is within this prefix).
        One host copy per micro-batch and ratio (cached: every layer of that ratio reuses it)."""
        cache: Dict[int, list] = self.__dict__.setdefault("_prefix_cache", {})
        if seq not in cache:
            cache[seq] = self._prefix(seq)
        return cache[seq]

    def _prefix(self, seq: int) -> list:
        ends = torch.where(self.valid, self.end, torch.full_like(self.end, seq)).contiguous()  # sorted per row
        t = torch.arange(seq, device=ends.device).expand(ends.shape[0], -1).contiguous()
        return torch.searchsorted(ends, t, right=True).amax(0).tolist()
