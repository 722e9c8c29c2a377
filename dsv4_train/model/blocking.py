"""How many queries the linear-memory attention processes per block (torch-free: the plan uses it too).

A block of b queries scores b x (window + b - 1) window keys (its span), its compressed entries
(all visible ones, or k gathered per query with their [b, k, c] key copies) for every head, in fp32.
The automatic block is the largest power of two in [MIN_BLOCK, MAX_BLOCK] whose working set stays
within WORKING_ELEMENTS_PER_BLOCK elements.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

from dsv4_train.config.model import CSA_RATIO

WORKING_ELEMENTS_PER_BLOCK = 1 << 22
MIN_BLOCK, MAX_BLOCK = 16, 256


def attention_block_elements(block: int, *, batch: int, heads: int, window: int, entries: int = 0,
                             gathered: int = 0, dim: int = 0) -> int:
    """Elements of one block's score tensor (+ gathered entries): entries = visible compressed
    entries shared by the block (HCA, CSA dense/warm-up) or the k gathered per query (CSA sparse)."""
    return block * batch * (heads * (window + block - 1 + entries + gathered) + gathered * dim)


def indexer_block_elements(block: int, *, batch: int, heads: int, entries: int) -> int:
    """Elements of one block's per-head index scores [B, block, heads, entries]."""
    return block * batch * heads * max(1, entries)


def auto_block_size(elements_of_block) -> int:
    """Largest power-of-two block whose `elements_of_block(block)` fits the budget (MIN_BLOCK at least)."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and elements_of_block(block) > WORKING_ELEMENTS_PER_BLOCK:
        block //= 2
    return block


def block_shapes(m, *, ratio: int, seq_len: int, batch: int, tp: int, phase: str) -> Tuple[dict, Optional[dict]]:
    """The arguments of `attention_block_elements` and (when the indexer runs: CSA layers outside the
    dense phase) `indexer_block_elements` for one attention layer of model config `m` on one TP rank,
    `seq_len` queries (this rank's) and their `seq_len // ratio` compressed entries."""
    sparse = ratio == CSA_RATIO and phase == "sparse"
    attention = dict(
        batch=batch, heads=m.num_attention_heads // tp, window=m.sliding_window, dim=m.head_dim,
        entries=0 if sparse or not ratio else seq_len // ratio, gathered=m.index_topk if sparse else 0,
    )
    indexer = None
    if ratio == CSA_RATIO and phase != "dense":
        indexer = dict(batch=batch, heads=m.index_n_heads // tp, entries=seq_len // ratio)
    return attention, indexer


def query_block(shape: dict, elements_of_block, block_size: int = 0) -> int:
    """The query block of the linear-memory path: `block_size` when set (> 0), else the automatic one."""
    return block_size if block_size > 0 else auto_block_size(functools.partial(elements_of_block, **shape))


def auto_runs_dense(m, *, ratio: int, seq_len: int, batch: int, tp: int, phase: str) -> bool:
    """Whether `model.attention_backend=auto` runs this layer on the dense path: when one query block
    of the linear-memory path (attention's and, if it runs, the indexer's) covers all `seq_len`
    queries. Blockwise would then score the same [T, keys] in a single block and only add ops (its
    per-block bookkeeping, the recompute in backward); dense instead keeps that block's
    probabilities for backward, at most WORKING_ELEMENTS_PER_BLOCK fp32 values per layer. Long
    sequences (more than one block) always take the linear-memory path."""
    attention, indexer = block_shapes(m, ratio=ratio, seq_len=seq_len, batch=batch, tp=tp, phase=phase)
    block = query_block(attention, attention_block_elements, m.attention_block_size)
    if indexer is not None:
        block = min(block, query_block(indexer, indexer_block_elements, m.attention_block_size))
    return seq_len <= block


def context_parallel_halo(window: int, compress_ratios) -> int:
    """Rows of the previous context-parallel rank an attention layer needs: the window minus the
    query itself; and, since packed documents make compression blocks start anywhere, a whole block
    that ends on this rank (ratio - 1 rows) plus, for the overlapping ratio-4 compressors, the
    previous block too (2 * 4 - 1 rows)."""
    ratios = [r for r in compress_ratios if r > 0]
    blocks = max([r - 1 for r in ratios] + [2 * 4 - 1 for r in ratios if r == 4] + [0])
    return max(window - 1, blocks)
