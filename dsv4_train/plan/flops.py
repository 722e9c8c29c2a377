"""Model FLOPs per token of a DeepSeek-V4 model, Megatron-Bridge conventions.

Same terms as Megatron-Bridge's `num_floating_point_operations` branch
`experimental_attention_variant == "dsv4_hybrid"`, so our
TF/s/GPU is comparable with their published rows:

* every GEMM counts 6 FLOPs per weight per token (forward, dgrad, wgrad; 2 per MAC); recompute,
  norms, softmax, routing, top-k, Sinkhorn and mHC matmuls are not counted;
* attention projections: low-rank q (with q-norm), one shared K=V projection (with kv-norm),
  grouped low-rank output projection;
* core attention per layer: heads x (window + visible compressed entries) x head_dim x 2 (QK and
  AV); ratio 0 sees the window only, HCA (ratio m) adds on average (s // m) / 2 compressed entries
  (causal halving), CSA adds the causally averaged min(top-k, s // 4) selected entries;
* compressors (wkv + wgate) on every compressed layer, indexer projections and the indexer's dense
  scoring over s // 4 compressed entries on CSA layers;
* MoE: top-k routed experts plus the shared experts (3 projections each) on every layer;
* MTP: each MTP layer is costed as a block with its own compress ratio, plus its eh projection
  (2 h^2) and norms (3 h), plus an extra logits GEMM; logits use the vocabulary padded to
  128 x TP like Megatron.

The returned breakdown is per token (the `seqlen_sum` factor of Megatron is one token here).
"""

from __future__ import annotations

from dsv4_train.config.model import CSA_RATIO, ModelConfig


def padded_vocab_size(vocab_size: int, *, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def flops_per_token(m: ModelConfig, *, seq_length: int, tp: int = 1) -> dict:
    """Training model FLOPs per token (forward + backward), with a per-term breakdown.

    Returns a dict of floats: "mlp", "attention_projections", "core_attention", "compressors",
    "indexer", "mtp_projection", "logits", "total", and "total_without_mtp" (the main model alone:
    MTP blocks, MTP projection and the MTP logits removed).
    """
    s = seq_length
    d, nh, c = m.hidden_size, m.num_attention_heads, m.head_dim
    ratios = list(m.compress_ratios)  # main layers then MTP layers
    n_blocks = len(ratios)
    n_mtp = m.mtp_num_layers

    def projections() -> float:
        q_term = m.q_lora_rank * (d + nh * c + 1)
        kv_term = d * c + c
        o_term = nh * c * m.o_lora_rank + m.o_groups * m.o_lora_rank * d
        return 6.0 * (q_term + kv_term + o_term)

    def core_attention(ratio: int) -> float:
        window = m.sliding_window
        if ratio == 0:
            visible = window
        elif ratio == CSA_RATIO:
            topk = min(m.index_topk, s // CSA_RATIO)
            visible = window + topk * (1 - topk * CSA_RATIO / (2 * s))
        else:
            visible = window + (s // ratio) / 2
        return 6.0 * nh * visible * c * 2

    def compressor(ratio: int) -> float:
        if ratio == 0:
            return 0.0
        width = 2 * c if ratio == CSA_RATIO else c
        return 6.0 * d * width * 2  # wkv + wgate

    def indexer(ratio: int) -> float:
        if ratio != CSA_RATIO:
            return 0.0
        ni, ci = m.index_n_heads, m.index_head_dim
        return 6.0 * (
            d * (2 * ci) * 2  # indexer compressor wkv + wgate
            + m.q_lora_rank * ni * ci  # indexer wq_b
            + d * ni  # weights_proj
            + ni * ci * (s // CSA_RATIO)  # dense scoring over all compressed entries
        )

    moe = 6.0 * d * 3 * m.moe_intermediate_size * (m.num_experts_per_tok + m.num_shared_experts)
    per_block = [
        {
            "mlp": moe,
            "attention_projections": projections(),
            "core_attention": core_attention(r),
            "compressors": compressor(r),
            "indexer": indexer(r),
        }
        for r in ratios
    ]
    vocab = padded_vocab_size(m.vocab_size, tp=tp)
    out = {key: sum(b[key] for b in per_block) for key in per_block[0]} if per_block else {}
    out["mtp_projection"] = 6.0 * n_mtp * (3 * d + 2 * d * d)
    out["logits"] = 6.0 * d * vocab * (1 + n_mtp)
    out["total"] = sum(out.values())
    mtp_blocks = per_block[n_blocks - n_mtp :] if n_mtp else []
    out["total_without_mtp"] = (
        out["total"]
        - sum(sum(b.values()) for b in mtp_blocks)
        - out["mtp_projection"]
        - 6.0 * d * vocab * n_mtp
    )
    return out
