"""How many queries the linear-memory attention processes per block (torch-free: the plan uses it too).

A block of b queries scores b x (window + b - 1) window keys (its span), its compressed entries
(all visible ones, or k gathered per query with their [b, k, c] key copies) for every head, in fp32.
The automatic block is the largest power of two in [MIN_BLOCK, MAX_BLOCK] whose working set stays
within WORKING_ELEMENTS_PER_BLOCK elements.
"""

from __future__ import annotations

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


def context_parallel_halo(window: int, compress_ratios) -> int:
    """Rows of the previous context-parallel rank an attention layer needs: the window minus the
    query itself; and, since packed documents make compression blocks start anywhere, a whole block
    that ends on this rank (ratio - 1 rows) plus, for the overlapping ratio-4 compressors, the
    previous block too (2 * 4 - 1 rows)."""
    ratios = [r for r in compress_ratios if r > 0]
    blocks = max([r - 1 for r in ratios] + [2 * 4 - 1 for r in ratios if r == 4] + [0])
    return max(window - 1, blocks)
