"""Parameter counts of a DeepSeek-V4 model from its config alone (no module is built).

Shapes follow the tensor inventory of the spec (§12); `gate.tid2eid` of hash-routed layers is a
buffer, not a parameter, so it is not counted. Counts are split per block into the parts that
matter for activation (routed experts vs everything else) and for placement (expert parameters
are sharded by EP, the rest by TP/PP).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4_train.config.model import CSA_RATIO, ModelConfig


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one transformer block (main layer or MTP layer)."""

    attention: int  # q/kv/o projections, norms, sink, compressor, indexer
    mhc: int  # hc_attn_* and hc_ffn_* (fn, base, scale)
    norms: int  # attn_norm + ffn_norm
    router: int  # gate weight
    shared_experts: int
    routed_experts: int  # all routed experts of the layer
    routed_expert_one: int  # one routed expert

    @property
    def dense(self) -> int:
        """Everything except routed experts: replicated over EP, sharded by TP."""
        return self.attention + self.mhc + self.norms + self.router + self.shared_experts

    @property
    def total(self) -> int:
        return self.dense + self.routed_experts

    def active(self, experts_per_tok: int) -> int:
        return self.dense + experts_per_tok * self.routed_expert_one


def compressor_params(*, hidden: int, head_dim: int, ratio: int) -> int:
    """wkv + wgate + ape + norm of a KV compressor; ratio 4 (CSA) uses overlapping 2x-wide blocks."""
    width = 2 * head_dim if ratio == CSA_RATIO else head_dim
    return 2 * width * hidden + ratio * width + head_dim


def attention_params(m: ModelConfig, ratio: int) -> int:
    d, nh, c = m.hidden_size, m.num_attention_heads, m.head_dim
    n = 0
    n += m.q_lora_rank * d + m.q_lora_rank  # wq_a + q_norm
    n += nh * c * m.q_lora_rank  # wq_b
    n += c * d + c  # wkv + kv_norm (single shared K=V head)
    n += m.o_groups * m.o_lora_rank * (nh * c // m.o_groups)  # wo_a (grouped)
    n += d * m.o_groups * m.o_lora_rank  # wo_b
    n += nh  # attn_sink
    if ratio > 0:
        n += compressor_params(hidden=d, head_dim=c, ratio=ratio)
    if ratio == CSA_RATIO:
        ni, ci = m.index_n_heads, m.index_head_dim
        n += ni * ci * m.q_lora_rank  # indexer.wq_b
        n += ni * d  # indexer.weights_proj
        n += compressor_params(hidden=d, head_dim=ci, ratio=CSA_RATIO)
    return n


def mhc_params(m: ModelConfig) -> int:
    """hc_fn [(2+n)n, n*d] + hc_base [(2+n)n] + hc_scale [3], for each of the two sub-layers."""
    n = m.hc_mult
    rows = (2 + n) * n
    return 2 * (rows * n * m.hidden_size + rows + 3)


def block_params(m: ModelConfig, *, ratio: int) -> BlockParams:
    d, f, e = m.hidden_size, m.moe_intermediate_size, m.num_routed_experts
    expert = 3 * f * d  # w1, w3 [f, d] and w2 [d, f]
    router = e * d  # gate.weight; the expert bias (gate.bias) and tid2eid are buffers, not trained by gradients
    return BlockParams(
        attention=attention_params(m, ratio),
        mhc=mhc_params(m),
        norms=2 * d,
        router=router,
        shared_experts=m.num_shared_experts * expert,
        routed_experts=e * expert,
        routed_expert_one=expert,
    )


def head_params(m: ModelConfig) -> int:
    """hc_head_fn [n, n*d] + hc_head_base [n] + hc_head_scale [1] + final norm [d]."""
    n = m.hc_mult
    return n * n * m.hidden_size + n + 1 + m.hidden_size


@dataclass(frozen=True)
class ModelParams:
    embedding: int
    output_layer: int  # untied LM head
    final: int  # final norm + hc_head
    blocks: list  # BlockParams per main layer
    mtp_blocks: list  # BlockParams per MTP layer
    mtp_extra: int  # per MTP layer: e_proj, h_proj, enorm, hnorm, norm, hc_head_*

    @property
    def main_total(self) -> int:
        return self.embedding + self.output_layer + self.final + sum(b.total for b in self.blocks)

    @property
    def mtp_total(self) -> int:
        return sum(b.total for b in self.mtp_blocks) + self.mtp_extra * len(self.mtp_blocks)

    def main_active(self, experts_per_tok: int) -> int:
        return (
            self.embedding
            + self.output_layer
            + self.final
            + sum(b.active(experts_per_tok) for b in self.blocks)
        )

    def mtp_active(self, experts_per_tok: int) -> int:
        return sum(b.active(experts_per_tok) for b in self.mtp_blocks) + self.mtp_extra * len(
            self.mtp_blocks
        )


def count_params(m: ModelConfig) -> ModelParams:
    blocks, mtp_blocks = [], []
    for layer in m.layer_schedule():
        bp = block_params(m, ratio=layer["compress_ratio"])
        (mtp_blocks if layer["is_mtp"] else blocks).append(bp)
    d = m.hidden_size
    embedding = m.vocab_size * d
    output_layer = 0 if m.tie_word_embeddings else m.vocab_size * d
    # MTP shares embedding and head with the main model; it owns e_proj, h_proj, enorm, hnorm, its
    # own final norm and hc_head.
    mtp_extra = 2 * d * d + 2 * d + head_params(m)
    return ModelParams(
        embedding=embedding,
        output_layer=output_layer,
        final=head_params(m),
        blocks=blocks,
        mtp_blocks=mtp_blocks,
        mtp_extra=mtp_extra,
    )
