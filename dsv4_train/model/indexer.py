"""Lightning indexer of CSA layers (paper §2.3) and its KL training loss, written by hand (V4-only).

Scores `I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . KI[s])` with `w = weights_proj(x) * cI^-1/2 * nI^-1/2`,
`qI = wq_b(c_q)` (RoPE on the last `rope_dim` channels at the query position) and `KI` from the
indexer's own overlapping ratio-4 compressor (dim `index_head_dim`). Invisible entries
(`s >= floor((t+1)/4)`) score -inf; the top `index_topk` visible entries are selected.

Training (paper §2.3; the DeepSeek-V3.2 report's DSA recipe): the indexer sees detached inputs (`x`, `c_q`), so it learns
only from its KL loss and the backbone never receives gradient from it. The target is the main
attention's (detached) joint-softmax probability mass on each compressed entry, summed over heads and
L1-renormalised over the support; the prediction is `softmax(I)` over the same support. Support =
all visible entries ("warmup" phase, dense KL) or the selected top-k ("sparse" phase).
Loss = coeff * mean over query rows with a non-empty support of KL(target || prediction).

Tensor parallel: indexer heads are split across TP ranks (`wq_b`, `weights_proj` column-parallel);
per-rank partial scores are summed with `reduce_from_tensor_model_parallel_region`. The compressor
is replicated; its output passes `copy_to_tensor_model_parallel_region` so it receives the gradient
of every rank's heads. Hadamard rotation and FP4 fake-quantisation of the official code are omitted
(orthonormal on both sides, so it only matters for quantisation).
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
import torch.utils.checkpoint
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from dsv4_train.config.model import CSA_RATIO, ModelConfig
from dsv4_train.model import sparse_attention
from dsv4_train.model.blocking import auto_block_size, indexer_block_elements
from dsv4_train.model.compressor import Compressor
from dsv4_train.model.parallel_linear import ColumnParallelLinear, copy_to_tp_region, reduce_from_tp_region
from dsv4_train.model.primitives import at_least_fp32
from dsv4_train.model.rope import InterleavedRotary, apply_interleaved_rope, rope_tables
from dsv4_train.model.sparse_attention import KeyLayout
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
        if model_cfg.index_head_dim < model_cfg.qk_rope_head_dim:
            raise ValueError(
                f"index_head_dim={model_cfg.index_head_dim} must be >= qk_rope_head_dim="
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

    def keys(
        self, x: torch.Tensor, positions: torch.Tensor, previous: Optional[torch.Tensor] = None, cp=None, blocks=None,
        precomputed: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The indexer's compressed keys [B, N, cI] of the whole sequence (gathered over CP).

        Computed from the detached x; gradients reach only the indexer's own compressor. blocks:
        packed documents' ratio-4 blocks (the main CSA compressor's), or None; precomputed: the keys
        of every rank already summed (packed documents under CP, see HybridAttention).
        """
        if precomputed is not None:
            keys = precomputed
        else:
            keys = self.compressor(
                x.detach(), positions, previous=None if previous is None else previous.detach(), blocks=blocks
            )
            if cp is not None:
                keys = gather_entries(keys, cp)  # [B, N, cI]
        return copy_to_tp_region(keys, self.wq_b.tp_group)

    def queries(self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor):
        """Indexer queries [t, B, hI_local, cI] (RoPE at `positions`) and head weights [t, B, hI_local]
        (fp32, with the cI^-1/2 * nI^-1/2 scale) of the rows of x / c_q, both detached here."""
        seq_len, batch, _ = x.shape
        q = self.wq_b(c_q.detach())[0].view(seq_len, batch, -1, self.head_dim)
        cos, sin = rope_tables(self.rotary, positions)  # [t, B | 1, r/2]
        q = apply_interleaved_rope(q, cos[:, :, None], sin[:, :, None])
        weights = at_least_fp32(self.weights_proj(x.detach())[0]) * (self.head_dim**-0.5 * self.num_heads**-0.5)
        return q, weights

    def score(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores (fp32, summed over every TP rank's heads) of queries q [t, B, h, cI] against
        shared keys [B, n, cI] -> [B, t, n], or per-query gathered keys [B, t, k, cI] -> [B, t, k]."""
        if keys.dim() == 3:
            per_head = torch.einsum("tbhd,bnd->bthn", at_least_fp32(q), at_least_fp32(keys)).relu()  # [B, t, h, n]
        else:
            per_head = torch.einsum("tbhd,btkd->bthk", at_least_fp32(q), at_least_fp32(keys)).relu()  # [B, t, h, k]
        partial = torch.einsum("bthn,tbh->btn", per_head, weights)
        return reduce_from_tp_region(partial, self.wq_b.tp_group)

    def scores(
        self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
        previous: Optional[torch.Tensor] = None, cp=None, blocks=None, precomputed=None,
    ) -> torch.Tensor:
        """Index scores [B, T, N] in fp32, -inf where `visible` [T, N] / [B, T, N] is False (dense reference).

        x: [T, B, hidden] and c_q: [T, B, q_lora_rank]; both are detached here so that the indexer
        never back-propagates into the backbone. Context parallel: `previous` [4, B, hidden] is the
        block before x (None on the first rank), `cp` the slice; the keys of every rank are gathered
        so the top-k sees every visible entry of the sequence.
        """
        keys = self.keys(x, positions, previous, cp, blocks=blocks, precomputed=precomputed)
        q, weights = self.queries(x, c_q, positions)
        return self.score(q, weights, keys).masked_fill(~visible, float("-inf"))

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Bool [B, T, N]: the top-`index_topk` visible entries per query (all visible if fewer)."""
        k = min(self.topk, scores.shape[-1])
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if k > 0:
            chosen.scatter_(-1, scores.detach().topk(k, dim=-1).indices, True)
        return chosen & visible

    # -- blockwise (linear-memory) path ------------------------------------------------------------
    def block_size(self, batch: int, num_entries: int, block_size: int = 0) -> int:
        if block_size > 0:
            return block_size
        local_heads = self.weights_proj.weight.shape[0]
        return auto_block_size(
            functools.partial(indexer_block_elements, batch=batch, heads=local_heads, entries=num_entries)
        )

    def select_topk(
        self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
        layout: KeyLayout, block_size: int = 0,
    ) -> torch.Tensor:
        """Top-`index_topk` visible entries per query, block by block: int32 [B, T, min(k, N)], -1 =
        no entry (fewer visible than k). The same choice as `select(scores(...))`; no [T, N] kept."""
        seq_len, batch, _ = x.shape
        num_entries = keys.shape[1]
        k = min(self.topk, num_entries)
        chosen = torch.full((batch, seq_len, k), -1, dtype=torch.int32, device=x.device)
        block = self.block_size(batch, num_entries, block_size)
        with torch.no_grad():
            for t0 in range(0, seq_len, block):
                t1 = min(seq_len, t0 + block)
                visible = layout.entries_visible(t1, num_entries)
                if visible == 0 or k == 0:
                    continue
                q, weights = self.queries(x[t0:t1], c_q[t0:t1], positions[..., t0:t1])
                scores = self.score(q, weights, keys[:, :visible])
                scores = scores.masked_fill_(~layout.entries_allowed(t0, t1, visible, x.device), float("-inf"))
                top = scores.topk(min(k, visible), dim=-1)
                index = top.indices.to(torch.int32).masked_fill_(top.values == float("-inf"), -1)
                chosen[:, t0:t1, : index.shape[-1]] = index
        return chosen

    def kl_loss_blockwise(
        self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
        main: "MainAttention", layout: KeyLayout, topk: Optional[torch.Tensor] = None, cp=None,
        block_size: int = 0,
    ) -> torch.Tensor:
        """`indexer_kl_loss` computed block by block (same rows, target and prediction).

        Support: every visible entry (topk None: warm-up phase) or the selected entries (sparse
        phase). The target mass of each block is recomputed from the main attention's detached
        queries, entries and log-sum-exp (`main`); each block is checkpointed, so its [t, h, n]
        indexer scores are rebuilt in backward instead of being kept.
        """
        seq_len, batch, _ = x.shape
        num_entries = keys.shape[1]
        block = self.block_size(batch, num_entries if topk is None else topk.shape[-1], block_size)
        total = keys.new_zeros((), dtype=torch.float32)
        rows = torch.zeros((), dtype=torch.int64, device=x.device)
        for t0 in range(0, seq_len, block):
            t1 = min(seq_len, t0 + block)
            span = (t0, t1, layout, None if topk is None else topk[:, t0:t1], main)
            kl_sum, count = torch.utils.checkpoint.checkpoint(
                self._kl_block, x[t0:t1], c_q[t0:t1], positions[..., t0:t1], keys, span,
                use_reentrant=False, preserve_rng_state=False,
            )
            total = total + kl_sum
            rows = rows + count
        return total / sum_over(rows, cp).clamp_min(1)

    def _kl_block(self, x, c_q, positions, keys, span):
        t0, t1, layout, topk, main = span
        q, weights = self.queries(x, c_q, positions)
        if topk is None:
            visible = layout.entries_visible(t1, keys.shape[1])
            support = layout.entries_allowed(t0, t1, visible, x.device).expand(x.shape[1], -1, -1)
            scores = self.score(q, weights, keys[:, :visible])
            mass = main.entry_mass(t0, t1, visible=visible)
        else:
            support = topk >= 0
            scores = self.score(q, weights, sparse_attention.gather_entries(keys, topk))
            mass = main.entry_mass(t0, t1, topk=topk)
        kl_rows, rows = _kl_rows(scores, reduce_from_tp_region(mass, self.wq_b.tp_group), support)
        return kl_rows.sum(), rows.sum()


class MainAttention:
    """Detached main-attention quantities the indexer's target needs, per query block.

    q [B, H_local, T, c], entries [B, N, c] (compressed main KV), lse [B, H_local, T] (log of the
    joint softmax denominator, sink included). entry_mass(t0, t1, ...) = the attention probability of
    each query on each supported entry, summed over this rank's heads -> [B, t, n|k] fp32.
    """

    def __init__(self, q: torch.Tensor, entries: torch.Tensor, lse: torch.Tensor, scale: float):
        self.q, self.entries, self.lse, self.scale = q.detach(), entries.detach(), lse.detach(), scale

    def entry_mass(self, t0: int, t1: int, *, visible: int = 0, topk: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.no_grad():
            q = self.q[:, :, t0:t1]
            batch, heads, rows, dim = q.shape
            lse = self.lse[:, :, t0:t1].unsqueeze(-1)
            if topk is None:
                logits = torch.bmm(q.reshape(batch, heads * rows, dim), self.entries[:, :visible].transpose(1, 2))
                probs = torch.exp(at_least_fp32(logits.view(batch, heads, rows, -1)) * self.scale - lse)
            else:
                gathered = sparse_attention.gather_entries(self.entries, topk)  # [B, t, k, c]
                logits = torch.matmul(q.transpose(1, 2), gathered.transpose(2, 3)).transpose(1, 2)
                probs = torch.exp(at_least_fp32(logits) * self.scale - lse).masked_fill(~(topk >= 0).unsqueeze(1), 0.0)
            # Prefix entries a query may not see are dropped by the caller's support mask.
            return probs.sum(dim=1)


def indexer_kl_loss(scores: torch.Tensor, target_mass: torch.Tensor, support: torch.Tensor, cp=None) -> torch.Tensor:
    """mean_rows KL(target || softmax(scores)) over `support`, rows with no support or mass skipped.

    scores: [B, T, N] index scores (carry the indexer's gradient); target_mass: [B, T, N] detached
    non-negative attention mass per entry (any scale; renormalised here over the support);
    support: [B, T, N] bool. Returns a scalar fp32 tensor (0 when no row qualifies).
    cp: under context parallelism, the rows are this rank's and the mean divides by the CP-global
    row count, so the ranks' losses sum to the unsplit loss.
    """
    kl_rows, rows = _kl_rows(scores, target_mass, support)
    # No host sync: average over qualifying rows via a masked sum.
    return kl_rows.sum() / sum_over(rows.sum(), cp).clamp_min(1)


def _kl_rows(scores: torch.Tensor, target_mass: torch.Tensor, support: torch.Tensor):
    """Per-row KL(target || softmax(scores)) over the support (0 for skipped rows) and the bool
    [..., rows] of rows that count (non-empty support with positive target mass)."""
    target = at_least_fp32(target_mass.detach()).masked_fill(~support, 0.0)
    row_mass = target.sum(-1, keepdim=True)
    rows = support.any(-1) & (row_mass.squeeze(-1) > 0)
    target = target / row_mass.clamp_min(torch.finfo(torch.float32).tiny)
    # Rows without support get neutral logits so log_softmax stays finite (they are dropped below).
    logits = at_least_fp32(scores).masked_fill(~support, float("-inf")).masked_fill(~rows.unsqueeze(-1), 0.0)
    log_pred = torch.log_softmax(logits, dim=-1).masked_fill(~support, 0.0)
    kl_rows = (torch.xlogy(target, target) - target * log_pred).sum(-1)
    return kl_rows.masked_fill(~rows, 0.0), rows
