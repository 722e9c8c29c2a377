"""Test-only helpers: tiny transformers `DeepseekV4ForCausalLM` oracles with non-trivial weights.

transformers' DeepseekV4 is used here as an independent oracle only (never imported by the
package). Its default init leaves norms at 1, mHC bases at 0, sinks / compressor position biases /
expert biases at 0 and the hash table all zeros; `randomize` moves every such tensor away from its
init so that a wrong mapping or formula in our model shows up as a logits difference.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

LAYER_TYPE_BY_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention"}


@dataclass
class TinyCase:
    """One tiny V4 configuration; `ratios` are the main layers' compress ratios (HCA ratio shared)."""

    name: str
    ratios: List[int]
    num_hash_layers: int
    hc_mult: int = 4
    o_groups: int = 2
    num_heads: int = 4
    window: int = 8
    topk: int = 2
    experts: int = 8
    index_topk: int = 4
    index_heads: int = 8
    hidden: int = 64
    vocab: int = 512
    seq: int = 64
    expert_weight_std: Optional[float] = None  # large -> SwiGLU clamp active
    seed: int = 0
    extra: Dict = field(default_factory=dict)

    def hf_config(self):
        from transformers import DeepseekV4Config

        hca = sorted({r for r in self.ratios if r not in (0, 4)})
        assert len(hca) <= 1, "transformers shares one HCA ratio across layers"
        layer_types = [LAYER_TYPE_BY_RATIO.get(r, "heavily_compressed_attention") for r in self.ratios]
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128}
        n = len(self.ratios)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DeepseekV4Config(
                vocab_size=self.vocab,
                hidden_size=self.hidden,
                moe_intermediate_size=32,
                num_hidden_layers=n,
                num_attention_heads=self.num_heads,
                head_dim=32,
                q_lora_rank=32,
                qk_rope_head_dim=8,
                num_experts_per_tok=self.topk,
                n_routed_experts=self.experts,
                layer_types=layer_types,
                compress_rates=rates,
                mlp_layer_types=["hash_moe"] * self.num_hash_layers + ["moe"] * (n - self.num_hash_layers),
                sliding_window=self.window,
                o_groups=self.o_groups,
                o_lora_rank=16,
                index_n_heads=self.index_heads,
                index_head_dim=16,
                index_topk=self.index_topk,
                hc_mult=self.hc_mult,
                max_position_embeddings=4096,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
                **self.extra,
            )


# The cases of the parity tests: they differ in layer schedule, compress ratios, hash layers,
# hc_mult, o_groups, window, top-k (and sequence length: 50 leaves trailing uncompressed tokens).
CASES = [
    TinyCase("tiny_default", ratios=[0, 4, 16, 4, 16], num_hash_layers=2),
    TinyCase("pro_like_hca_first", ratios=[16, 16, 4, 16, 4], num_hash_layers=3, hc_mult=2, o_groups=4,
             window=16, topk=3, experts=6, index_topk=8, seed=1),
    TinyCase("swa_only_no_hash_clamped", ratios=[0, 0, 0], num_hash_layers=0, hc_mult=3, o_groups=1,
             window=4, topk=4, experts=8, expert_weight_std=0.6, seed=2),
    TinyCase("flash_like_odd_len", ratios=[0, 0, 4, 8, 4], num_hash_layers=1, o_groups=2, window=32,
             topk=2, experts=16, index_topk=2, index_heads=16, seq=50, seed=3),
]


@torch.no_grad()
def randomize(model, case: TinyCase) -> None:
    """Move every tensor with a degenerate init away from it (see module docstring)."""
    gen = torch.Generator().manual_seed(1000 + case.seed)

    def noise(t, std):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * std

    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            param.copy_(1.0 + noise(param, 0.2))
        elif name.endswith(("attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
            param.copy_(noise(param, 1.0))
        elif name.endswith(("attn_hc.scale", "ffn_hc.scale", "hc_head.hc_scale")):
            param.copy_(1.0 + noise(param, 0.3))
        elif name.endswith(("attn_hc.fn", "ffn_hc.fn", "hc_head.hc_fn")):
            # 2.5x the HF init std: per-token coefficients vary visibly (mix std ~0.8) while fp32
            # rounding of the [n*d]-wide mixing dot products stays ~1e-7 relative.
            param.copy_(noise(param, 0.05))
        elif name.endswith("sinks"):
            param.copy_(noise(param, 1.0))
        elif name.endswith("position_bias"):
            param.copy_(noise(param, 0.5))
        elif case.expert_weight_std and (name.endswith("gate_up_proj") or "shared_experts.gate_proj" in name
                                         or "shared_experts.up_proj" in name):
            param.copy_(noise(param, case.expert_weight_std))
        elif case.expert_weight_std and name.endswith("down_proj"):
            param.copy_(noise(param, 0.005))  # keep clamped experts' outputs O(1)
        elif name.endswith("weight") and param.dim() == 2:
            param.copy_(noise(param, 0.1))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(noise(buf, 0.05))
        elif name.endswith("tid2eid"):
            vocab, k = buf.shape
            buf.copy_(torch.rand(vocab, case.experts, generator=gen).argsort(dim=-1)[:, :k])


def build_hf(case: TinyCase):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(case.seed)
    model = DeepseekV4ForCausalLM(case.hf_config()).float()
    randomize(model, case)
    return model.eval()


def save_hf(model, directory: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    assert os.path.exists(os.path.join(directory, "config.json"))
    return directory


def input_ids(case: TinyCase, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7 + case.seed)
    return torch.randint(0, case.vocab, (batch, case.seq), generator=gen)
