"""transformers' DeepseekV4 attention as a TEST-ONLY oracle for `HybridAttention`.

Builds the HF attention layer for the tiny config (our `conf/model/tiny.yaml` values), fills it with
random weights, copies them into our module through the official-name mapping, and runs HF the way
`DeepseekV4Model.forward` does (per-rope-type cos/sin, sliding-window causal mask, position_ids).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from dsv4_train.config.model import ModelConfig

# HF parameter name (inside DeepseekV4Attention) -> our name (official DeepSeek naming).
HF_TO_OURS: Dict[str, str] = {
    "sinks": "attn_sink",
    "q_a_proj.weight": "wq_a.weight",
    "q_a_norm.weight": "q_norm.weight",
    "q_b_proj.weight": "wq_b.weight",
    "kv_proj.weight": "wkv.weight",
    "kv_norm.weight": "kv_norm.weight",
    "o_a_proj.weight": "wo_a.weight",
    "o_b_proj.weight": "wo_b.weight",
    "compressor.position_bias": "compressor.ape",
    "compressor.kv_proj.weight": "compressor.wkv.weight",
    "compressor.gate_proj.weight": "compressor.wgate.weight",
    "compressor.kv_norm.weight": "compressor.norm.weight",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_proj.weight": "indexer.compressor.wkv.weight",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.wgate.weight",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight",
    "compressor.indexer.q_b_proj.weight": "indexer.wq_b.weight",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.weights_proj.weight",
}

_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV4Config

    hca_ratios = {r for r in cfg.compress_ratios if r not in (0, 4)}
    assert len(hca_ratios) <= 1, "HF supports a single HCA ratio"
    hca = hca_ratios.pop() if hca_ratios else 128
    layer_types = [_LAYER_TYPE.get(r, "heavily_compressed_attention") for r in cfg.compress_ratios[: cfg.num_layers]]
    hf = DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        q_lora_rank=cfg.q_lora_rank,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca},
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={
            "rope_type": "yarn",
            "factor": cfg.yarn.factor,
            "original_max_position_embeddings": cfg.yarn.original_max_position_embeddings,
            "beta_fast": cfg.yarn.beta_fast,
            "beta_slow": cfg.yarn.beta_slow,
        },
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        n_routed_experts=cfg.num_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
    )
    hf._attn_implementation = "eager"
    return hf


def random_hf_attention(cfg: ModelConfig, layer_index: int, seed: int):
    """HF DeepseekV4Attention (fp32) with random weights whose activations stay O(1)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

    hf_cfg = hf_config(cfg)
    attn = hf_mod.DeepseekV4Attention(hf_cfg, layer_index).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name in ("sinks",) or name.endswith("position_bias"):
                p.copy_(0.5 * noise)
            else:  # [out, in] projections: unit-variance outputs
                p.copy_(noise / p.shape[-1] ** 0.5)
    return hf_cfg, attn


def copy_hf_into_ours(hf_attn, ours) -> None:
    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf_attn.named_parameters())
    assert set(hf_params) == {k for k in HF_TO_OURS if k in hf_params} and len(hf_params) == len(ours_params), (
        sorted(hf_params),
        sorted(ours_params),
    )
    with torch.no_grad():
        for hf_name, p in hf_params.items():
            target = ours_params[HF_TO_OURS[hf_name]]
            assert target.shape == p.shape, (hf_name, target.shape, p.shape)
            target.copy_(p)


def run_hf(hf_cfg, hf_attn, x_bsd: torch.Tensor) -> torch.Tensor:
    """x: [B, S, d] -> HF attention output [B, S, d], called as DeepseekV4Model does."""
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

    batch, seq_len, _ = x_bsd.shape
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
    rotary = hf_mod.DeepseekV4RotaryEmbedding(hf_cfg)
    position_embeddings = {
        "main": rotary(x_bsd, position_ids=position_ids, layer_type="main"),
        "compress": rotary(x_bsd, position_ids=position_ids, layer_type="compress"),
    }
    mask = create_sliding_window_causal_mask(
        config=hf_cfg, inputs_embeds=x_bsd, attention_mask=None, cache=None, position_ids=position_ids
    )
    out, _ = hf_attn(x_bsd, position_embeddings=position_embeddings, position_ids=position_ids, attention_mask=mask)
    return out


def run_ours(ours, x_bsd: torch.Tensor) -> torch.Tensor:
    return ours(x_bsd.transpose(0, 1)).transpose(0, 1)


def grads_by_hf_name(hf_attn, ours) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    ours_params = dict(ours.named_parameters())
    hf_grads, our_grads = {}, {}
    for hf_name, p in hf_attn.named_parameters():
        if p.grad is not None:
            hf_grads[hf_name] = p.grad
            our_grads[hf_name] = ours_params[HF_TO_OURS[hf_name]].grad
    return hf_grads, our_grads
