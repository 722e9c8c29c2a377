"""Newton-Schulz cost of Muon (paper §2.4) from the config alone: the logically independent matrices
of the model (train/muon.py's split: each expert's gate, up and down; each `wo_a` group) and the
FLOPs of the 10 hybrid iterations on each, per optimizer step.

One iteration on X [a, b] (a <= b: the wide orientation) costs X Xᵀ (2a²b), its square (2a³) and
the product with X (2a²b). Counted once per matrix: under TP every rank of the group repeats the
gathered matrix's iteration, under DP sharding only its owner runs it.
"""

from __future__ import annotations

from typing import List, Tuple

from dsv4_train.config.model import CSA_RATIO, ModelConfig

NS_ITERATIONS = 10


def block_matrices(m: ModelConfig, ratio: int) -> List[Tuple[int, int, int]]:
    """(rows, cols, count) of one block's Muon matrices (mirrors plan/params.py's inventory)."""
    d, nh, c, n = m.hidden_size, m.num_attention_heads, m.head_dim, m.hc_mult
    f = m.moe_intermediate_size
    out = [(m.q_lora_rank, d, 1), (nh * c, m.q_lora_rank, 1), (c, d, 1),
           (m.o_lora_rank, nh * c // m.o_groups, m.o_groups), (d, m.o_groups * m.o_lora_rank, 1),
           ((2 + n) * n, n * d, 2), (m.num_routed_experts, d, 1)]
    experts = m.num_routed_experts + m.num_shared_experts
    out += [(f, d, 2 * experts), (d, f, experts)]  # gate and up halves, down
    if ratio > 0:
        out.append((2 * c if ratio == CSA_RATIO else c, d, 2))  # compressor wkv, wgate
    if ratio == CSA_RATIO:
        ni, ci = m.index_n_heads, m.index_head_dim
        out += [(ni * ci, m.q_lora_rank, 1), (ni, d, 1), (2 * ci, d, 2)]
    return out


def model_matrices(m: ModelConfig) -> List[Tuple[int, int, int]]:
    """Every Muon matrix of the model with its MTP layers (AdamW: embedding, head, norms, mHC scalars)."""
    d, n = m.hidden_size, m.hc_mult
    out = []
    for layer in m.layer_schedule():
        out += block_matrices(m, layer["compress_ratio"])
        if layer["is_mtp"]:
            out += [(d, d, 2), (n, n * d, 1)]  # e_proj, h_proj; its hc_head fn
    out.append((n, n * d, 1))  # hc_head fn
    return out


def matrix_flops(rows: int, cols: int) -> float:
    """FLOPs of the 10 iterations on one [rows, cols] matrix."""
    a, b = min(rows, cols), max(rows, cols)
    return NS_ITERATIONS * (4 * a * a * b + 2 * a**3)


def newton_schulz_flops(m: ModelConfig) -> float:
    """FLOPs of Newton-Schulz per optimizer step over the whole model."""
    return sum(count * matrix_flops(rows, cols) for rows, cols, count in model_matrices(m))


def muon_param_count(m: ModelConfig) -> int:
    return sum(rows * cols * count for rows, cols, count in model_matrices(m))
