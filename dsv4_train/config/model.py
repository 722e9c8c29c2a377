"""Typed configuration of the DeepSeek-V4 architecture.

One dataclass describes every V4 model size (tiny / flash / pro differ only in values, see
`conf/model/*.yaml`). Field names follow the Hugging Face `DeepseekV4Config` where one exists, so
users can read a released `config.json` next to our YAML. The per-layer structure (attention mode,
hash vs scored routing) is derived from these fields by `layer_schedule()`; no module decides it
on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

ATTENTION_MODE_BY_RATIO = {0: "sliding_window", 4: "csa"}  # any other ratio > 0 is HCA
CSA_RATIO = 4
ATTENTION_BACKENDS = ("auto", "dense", "blockwise", "flex")
SINKHORN_KERNELS = ("auto", "eager", "compiled")
COMPILE_BACKENDS = ("inductor", "aot_eager")


@dataclass
class YarnConfig:
    """YaRN scaling of the RoPE frequencies, applied only to compressed (ratio > 0) layers."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class ModelConfig:
    """DeepSeek-V4 hyper-parameters (paper §4.2.1). Defaults are the released Flash values."""

    name: str = "flash"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512  # q, k (=v) and attention output per head
    qk_rope_head_dim: int = 64  # RoPE on the last dims of each head (interleaved pairs)
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128  # includes the query token itself
    # One entry per main layer plus one per MTP layer: 0 = sliding window only, 4 = CSA, other > 0 = HCA.
    compress_ratios: List[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnConfig = field(default_factory=YarnConfig)
    max_position_embeddings: int = 1048576
    # Lightning indexer (CSA layers only).
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # "dense": CSA attends to every visible compressed entry, no indexer loss;
    # "warmup": dense attention, indexer trained with dense KL; "sparse": top-k attention, sparse KL.
    indexer_phase: str = "sparse"
    indexer_loss_coeff: float = 1.0
    # Core attention implementation (same maths and parameters): "dense" = masked [T, T+N] scores
    # (the test reference), "blockwise" = exact query-block attention with gathered top-k entries
    # and a recomputing backward (linear memory, model/sparse_attention.py), "flex" = torch
    # FlexAttention block masks (needs CUDA to train; CSA's sparse phase uses the gather path),
    # "auto" = dense when one query block covers a layer's queries (model/blocking.py), else flex on
    # CUDA, blockwise otherwise.
    attention_backend: str = "auto"
    attention_block_size: int = 0  # queries per block of the blockwise path; 0 = automatic
    # mHC hyper-connections.
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1.0e-6
    # mHC's Sinkhorn step loops (model/sinkhorn.py; same values): "eager" = 3 (forward) / 4 (backward) torch ops per
    # step, "compiled" = one torch.compile kernel per loop (compiled at start-up), "auto" = compiled
    # on CUDA (the eager loops are ~270 kernel launches per mHC; a compile failure warns and runs
    # eagerly), eager on CPU.
    sinkhorn_kernel: str = "auto"
    # torch.compile each transformer block (model/block_compile.py; regional compilation, as torchtitan
    # does): mHC, norms, attention and MoE maths fused into a few kernels per block. The first step
    # compiles each distinct block kind (minutes on CPU); values agree with eager up to fusion's
    # rounding. Off by default: start-up cost, and never run on a GPU yet.
    compile: bool = False
    # torch.compile backend of model.compile: "inductor" (fused kernels, the point of compiling) or
    # "aot_eager" (the same graph capture and autograd, torch's own kernels, values bitwise eager:
    # tells a capture problem from a kernel-rounding one, and compiles in seconds).
    compile_backend: str = "inductor"
    # MoE (every layer is MoE; the first `num_hash_layers` are hash-routed).
    num_hash_layers: int = 3
    num_routed_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    score_function: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    expert_bias_update_rate: float = 1.0e-3  # noaux_tc bias speed gamma
    seq_aux_loss_coeff: float = 1.0e-4  # sequence-wise balance loss alpha
    # How the routed experts compute (same maths and checkpoints either way): "grouped" = stacked
    # expert weights, one torch._grouped_mm per projection (model/grouped_experts.py),
    # "sequential" = Megatron's SequentialMLP (one MLP per expert), "batched" = all local experts
    # as two padded bmm's (model/experts.py; stacks the weights each step), "auto" = grouped.
    moe_expert_compute: str = "auto"
    # Seed of the deterministic tid2eid table generated when training from scratch.
    hash_table_seed: int = 1234
    # Multi-token prediction.
    mtp_num_layers: int = 1
    mtp_loss_weight: float = 0.3
    mtp_loss_weight_after_decay: float = 0.1  # used once LR decay starts
    rms_norm_eps: float = 1.0e-6
    init_std: float = 0.02
    tie_word_embeddings: bool = False

    def layer_schedule(self) -> List[dict]:
        """Per-layer description for the main stack followed by the MTP layers.

        Each entry: {"index", "compress_ratio", "attention" ("sliding_window" | "csa" | "hca"),
        "hash_routed" (bool), "is_mtp" (bool)}.
        """
        schedule = []
        for index, ratio in enumerate(self.compress_ratios):
            is_mtp = index >= self.num_layers
            attention = ATTENTION_MODE_BY_RATIO.get(ratio, "hca")
            schedule.append(
                {
                    "index": index,
                    "compress_ratio": ratio,
                    "attention": attention,
                    "hash_routed": (not is_mtp) and index < self.num_hash_layers,
                    "is_mtp": is_mtp,
                }
            )
        return schedule
