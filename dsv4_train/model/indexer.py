"""Lightning indexer of CSA layers (spec §4) and its KL training loss, written by hand (V4-only).

Scores `I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . KI[s])` with `w = weights_proj(x) * cI^-1/2 * nI^-1/2`,
`qI = wq_b(c_q)` (RoPE on the last `rope_dim` channels at the query position) and `KI` from the
indexer's own overlapping ratio-4 compressor (dim `index_head_dim`). Invisible entries
(`s >= floor((t+1)/4)`) score -inf; the top `index_topk` visible entries are selected.

Training (spec §4, [V32]/[MCORE] recipe): the indexer sees detached inputs (`x`, `c_q`), so it learns
only from its KL loss and the backbone never receives gradient from it. The target is the main
attention's (detached) joint-softmax probability mass on each compressed entry, summed over heads and
L1-renormalised over the support; the prediction is `softmax(I)` over the same support. Support =
all visible entries ("warmup" phase, dense KL) or the selected top-k ("sparse" phase).
Loss = coeff * mean over query rows with a non-empty support of KL(target || prediction).

Tensor parallel: indexer heads are split across TP ranks (`wq_b`, `weights_proj` column-parallel);
per-rank partial scores are summed with `reduce_from_tensor_model_parallel_region`. The compressor
is replicated; its output passes `copy_to_tensor_model_parallel_region` so it receives the gradient
of every rank's heads. Hadamard rotation and FP4 fake-quantisation of the official code are omitted
(spec §13.10: orthonormal on both sides, quantisation-only).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from dsv4_train.config.model import CSA_RATIO, ModelConfig
from dsv4_train.model.compressor import Compressor
from dsv4_train.model.parallel_linear import ColumnParallelLinear, copy_to_tp_region, reduce_from_tp_region
from dsv4_train.model.rope import InterleavedRotary, apply_interleaved_rope
from dsv4_train.parallel.context import gather_entries, sum_over


def _without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """Column-parallel layers here consume an already sequence-gathered input."""
    if not config.sequence_parallel:
        return config
    local = copy.copy(config)
    local.sequence_parallel = False
    return local


class LightningIndexer(MegatronModule):
    # A MegatronModule so that checkpoints keep its TP-split `wq_b` / `weights_proj` sharded (a plain
    # nn.Module child is saved as if replicated).
    def __init__(self, *, config: TransformerConfig, model_cfg: ModelConfig, rotary: InterleavedRotary):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if model_cfg.index_n_heads % tp:
            raise ValueError(
                f"index_n_heads={model_cfg.index_n_heads} must be divisible by the tensor-parallel size "
                f"{tp} (indexer heads are split across TP ranks); change model.index_n_heads or the TP size."
            )
        if model_cfg.index_head_dim <= model_cfg.qk_rope_head_dim:
            raise ValueError(
                f"index_head_dim={model_cfg.index_head_dim} must exceed qk_rope_head_dim="
                f"{model_cfg.qk_rope_head_dim} (RoPE covers the last qk_rope_head_dim channels)."
            )
        self.num_heads = model_cfg.index_n_heads
        self.head_dim = model_cfg.index_head_dim
        self.topk = model_cfg.index_topk
        self.rotary = rotary
        col_config = _without_sequence_parallel(config)
        self.wq_b = ColumnParallelLinear(
            model_cfg.q_lora_rank,
            self.num_heads * self.head_dim,
            config=col_config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.weights_proj = ColumnParallelLinear(
            model_cfg.hidden_size,
            self.num_heads,
            config=col_config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.compressor = Compressor(
            hidden_size=model_cfg.hidden_size,
            head_dim=self.head_dim,
            ratio=CSA_RATIO,
            rotary=rotary,
            eps=model_cfg.rms_norm_eps,
            init_method=config.init_method,
            params_dtype=config.params_dtype,
        )

    def scores(
        self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
        previous: Optional[torch.Tensor] = None, cp=None,
    ) -> torch.Tensor:
        """Index scores [B, T, N] in fp32, -inf where `visible` [T, N] is False.

        x: [T, B, hidden] and c_q: [T, B, q_lora_rank]; both are detached here so that the indexer
        never back-propagates into the backbone. Context parallel: `previous` [4, B, hidden] is the
        block before x (None on the first rank), `cp` the slice; the keys of every rank are gathered
        so the top-k sees every visible entry of the sequence.
        """
        x, c_q = x.detach(), c_q.detach()
        seq_len, batch, _ = x.shape
        keys = self.compressor(x, positions, previous=None if previous is None else previous.detach())  # [B, n, cI]
        if cp is not None:
            keys = gather_entries(keys, cp)  # [B, N, cI]
        keys = copy_to_tp_region(keys, self.wq_b.tp_group)
        q = self.wq_b(c_q)[0].view(seq_len, batch, -1, self.head_dim)  # [T, B, hI_local, cI]
        cos, sin = self.rotary.cos_sin(positions)
        q = apply_interleaved_rope(q, cos[:, None, None], sin[:, None, None])
        weights = self.weights_proj(x)[0].float() * (self.head_dim**-0.5 * self.num_heads**-0.5)
        per_head = torch.einsum("tbhd,bnd->bthn", q.float(), keys.float()).relu()  # [B, T, hI_local, N]
        partial = torch.einsum("bthn,tbh->btn", per_head, weights)
        total = reduce_from_tp_region(partial, self.wq_b.tp_group)
        return total.masked_fill(~visible, float("-inf"))

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Bool [B, T, N]: the top-`index_topk` visible entries per query (all visible if fewer)."""
        k = min(self.topk, scores.shape[-1])
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if k > 0:
            chosen.scatter_(-1, scores.detach().topk(k, dim=-1).indices, True)
        return chosen & visible


def indexer_kl_loss(scores: torch.Tensor, target_mass: torch.Tensor, support: torch.Tensor, cp=None) -> torch.Tensor:
    """mean_rows KL(target || softmax(scores)) over `support`, rows with no support or mass skipped.

    scores: [B, T, N] index scores (carry the indexer's gradient); target_mass: [B, T, N] detached
    non-negative attention mass per entry (any scale; renormalised here over the support);
    support: [B, T, N] bool. Returns a scalar fp32 tensor (0 when no row qualifies).
    cp: under context parallelism, the rows are this rank's and the mean divides by the CP-global
    row count, so the ranks' losses sum to the unsplit loss.
    """
    target = target_mass.detach().float().masked_fill(~support, 0.0)
    row_mass = target.sum(-1, keepdim=True)
    rows = support.any(-1) & (row_mass.squeeze(-1) > 0)
    target = target / row_mass.clamp_min(torch.finfo(torch.float32).tiny)
    # Rows without support get neutral logits so log_softmax stays finite (they are dropped below).
    logits = scores.float().masked_fill(~support, float("-inf")).masked_fill(~rows.unsqueeze(-1), 0.0)
    log_pred = torch.log_softmax(logits, dim=-1).masked_fill(~support, 0.0)
    kl_rows = (torch.xlogy(target, target) - target * log_pred).sum(-1)
    # No host sync: average over qualifying rows via a masked sum.
    return kl_rows.masked_fill(~rows, 0.0).sum() / sum_over(rows.sum(), cp).clamp_min(1)
