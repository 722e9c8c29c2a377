"""DeepSeek-V4 hybrid attention (paper §2.3): one Megatron-Core module, three modes by compress ratio.

* ratio 0 (sliding window): each query attends to the `sliding_window` most recent tokens,
  itself included.
* ratio 4 (CSA): window plus compressed entries (overlapping compressor); the lightning indexer
  picks the top-`index_topk` visible entries (phase "sparse"); phases "dense"/"warmup" attend to
  every visible entry (see `indexer.py` for the indexer loss).
* other ratio > 0 (HCA): window plus every visible compressed entry (non-overlapping compressor).

Common path: shared low-rank query `wq_a -> q_norm -> wq_b`, per-head weightless RMSNorm, a single
shared K=V head `wkv -> kv_norm`, interleaved partial RoPE, ONE joint softmax over window and
compressed keys with a learnable per-head sink logit (zero value), de-rotation of the output's RoPE
channels, then the grouped output projection (block-diagonal `wo_a` per group -> `wo_b`).

Megatron-Core parts: `MegatronModule`, `ColumnParallelLinear` (wq_b; wo_a as a TP-split weight
holder used block-diagonally), `RowParallelLinear` (wo_b) and the TP copy/reduce regions. Written
by hand because Megatron-Core 0.19.2 has no V4 attention (no sink+compressed joint softmax,
compressor, indexer or grouped output projection).

Tensor parallel: query heads, sinks, `wo_a` groups and indexer heads are split across TP ranks;
`wq_a`, `wkv`, the norms and the compressors are replicated. Replicated outputs that feed
head-split work (window KV, compressed KV) go through `copy_to_tensor_model_parallel_region`, so
the replicated weights receive the sum of every rank's gradient (identical on all ranks);
`wq_b`'s own input copy does the same for `c_q`. With sequence parallelism the input is gathered
once at entry (backward: split, since the gradients reaching it are already complete) and `wo_b`
reduce-scatters the output.

Core attention (`model.attention_backend`): "dense" is the masked reference (keys = window KV of
all T tokens + the N compressed entries, a [T, T+N] visibility mask, the sink as an extra logit
column; it keeps one [B, H, T, T+N] probability tensor for backward). "blockwise" (model/
sparse_attention.py) computes the same softmax per query block over only the keys each block may
see, with the CSA top-k entries gathered per query and a backward that recomputes each block from
the log-sum-exp; the indexer selects and computes its KL loss block by block too (linear memory).
"flex" runs the window + compressed part as one FlexAttention call (model/flex_attention.py).
Masks use sequence indices; `position_ids` only drives RoPE (a contiguous chunk whose first token
starts a compression block).

Context parallel (`cp`, a `parallel.context.ContextParallelSlice`): this rank's queries are one
contiguous slice of the sequence. The window keys are extended by a halo (the previous rank's last
rows of x, recomputed through wkv/kv_norm/RoPE here), the overlapping compressors get the previous
block from the same halo, and the compressed entries (main and indexer) are all-gathered over CP, so
every query sees exactly the keys it sees unsplit; masks use global sequence indices.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

from dsv4_train.config.model import ATTENTION_BACKENDS, ATTENTION_MODE_BY_RATIO, CSA_RATIO, ModelConfig
from dsv4_train.model import aux_losses
from dsv4_train.model.blocking import auto_runs_dense
from dsv4_train.model.compressor import Compressor
from dsv4_train.model.documents import Documents
from dsv4_train.model.flex_attention import available as flex_available
from dsv4_train.model.flex_attention import flex_joint_attention
from dsv4_train.model.indexer import LightningIndexer, MainAttention, _without_sequence_parallel, indexer_kl_loss
from dsv4_train.model.parallel_linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp_region,
    reduce_from_tp_region,
)
from dsv4_train.model.primitives import ReplicatedLinear, RMSNorm, at_least_fp32, rms_normalize
from dsv4_train.model.rope import apply_interleaved_rope, layer_rotary, rope_tables
from dsv4_train.model.sparse_attention import DocumentMasks, KeyLayout, blockwise_attention
from dsv4_train.parallel import context as cp_context

INDEXER_PHASES = ("dense", "warmup", "sparse")
INDEXER_LOSS_NAME = "indexer_loss"


@functools.lru_cache(maxsize=64)
def window_mask(seq_len: int, window: int, device: torch.device, *, halo: int = 0, offset: int = 0) -> torch.Tensor:
    """Bool [T, halo + T]: query t may attend key j iff t - window < j <= t (window includes t itself).

    CP: queries are sequence indices offset..offset+T-1, keys the `halo` tokens before them then the
    queries' own tokens; keys before the sequence start (rank 0's halo) are never visible.
    Cached (a pure function of its arguments, rebuilt by every layer otherwise): read-only.
    """
    t = torch.arange(seq_len, device=device) + offset
    j = torch.arange(-halo, seq_len, device=device) + offset
    distance = t[:, None] - j[None, :]
    return (distance >= 0) & (distance < window) & (j >= 0)[None, :]


@functools.lru_cache(maxsize=64)
def compressed_visibility(
    seq_len: int, ratio: int, device: torch.device, *, offset: int = 0, num_entries: Optional[int] = None
) -> torch.Tensor:
    """Bool [T, N]: query t may see entry s iff s < floor((t + 1) / ratio) (block complete).

    CP: queries are sequence indices offset..offset+T-1 and N (default T // ratio) counts the
    entries of the whole sequence. Cached like `window_mask`: read-only.
    """
    t = torch.arange(seq_len, device=device) + offset
    s = torch.arange(seq_len // ratio if num_entries is None else num_entries, device=device)
    return s[None, :] < ((t + 1) // ratio)[:, None]


def joint_softmax_attention(
    q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Single-KV-head attention with one softmax over all allowed keys plus a per-head sink logit.

    q: [B, H, T, c]; keys: [B, L, c] (also the values); allowed: bool [T, L] or [B, T, L];
    sink: [H]. Returns (out [B, H, T, c] in q.dtype, probs [B, H, T, L] in fp32). Each probs row sums
    to 1 - p_sink < 1. Every row must allow at least one key (the window always holds the query).
    """
    batch, heads, seq_len, dim = q.shape
    num_keys = keys.shape[1]
    # One [B, H*T, L] matmul: the single KV head is shared by all query heads (MQA), no expansion.
    logits = torch.bmm(q.reshape(batch, heads * seq_len, dim), keys.transpose(1, 2))
    # In place from here on: bmm's backward needs only its inputs, so one [B, H, T, L] buffer suffices.
    logits = at_least_fp32(logits.view(batch, heads, seq_len, num_keys)).mul_(scale)
    mask = allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed  # broadcast over heads
    logits.masked_fill_(~mask, float("-inf"))
    sink_column = at_least_fp32(sink).to(logits.dtype).view(1, heads, 1, 1).expand(batch, heads, seq_len, 1)
    probs = torch.softmax(torch.cat((logits, sink_column), dim=-1), dim=-1)[..., :num_keys]
    out = torch.bmm(probs.to(keys.dtype).reshape(batch, heads * seq_len, num_keys), keys)
    return out.view(batch, heads, seq_len, dim), probs


def resolve_backend(choice: str, device: torch.device, *, one_block: bool = False) -> str:
    """model.attention_backend -> "dense" | "blockwise" | "flex" for tensors on `device` ("auto":
    dense when one query block covers the layer's queries (`one_block`, model/blocking.py
    `auto_runs_dense`), else flex where the activations are on CUDA, blockwise otherwise, e.g.
    run.device=cpu on a GPU host)."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={choice!r} is not one of {ATTENTION_BACKENDS}.")
    if choice == "auto":
        if one_block:
            return "dense"
        return "flex" if device.type == "cuda" and flex_available() else "blockwise"
    return choice


class HybridAttention(MegatronModule):
    """V4 attention of main layer / MTP layer `layer_index` (index into `model_cfg.compress_ratios`)."""

    def __init__(self, *, config: TransformerConfig, model_cfg: ModelConfig, layer_index: int):
        super().__init__(config=config)
        _validate(config, model_cfg, layer_index)
        tp = config.tensor_model_parallel_size
        self.model_cfg = model_cfg
        self.layer_index = layer_index
        self.ratio = model_cfg.compress_ratios[layer_index]
        self.mode = ATTENTION_MODE_BY_RATIO.get(self.ratio, "hca")
        self.num_heads = model_cfg.num_attention_heads
        self.num_local_heads = self.num_heads // tp
        self.num_local_groups = model_cfg.o_groups // tp
        self.head_dim = model_cfg.head_dim
        self.window = model_cfg.sliding_window
        self.eps = model_cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5  # no YaRN mscale (paper §2.3)
        self.rotary = layer_rotary(model_cfg, layer_index)
        self.backend_choice = model_cfg.attention_backend
        resolve_backend(self.backend_choice, torch.device("cpu"))  # refuse an unknown name at build
        hidden, dtype = model_cfg.hidden_size, config.params_dtype
        col_config = _without_sequence_parallel(config)

        self.wq_a = ReplicatedLinear(hidden, model_cfg.q_lora_rank, init_method=config.init_method, params_dtype=dtype)
        self.q_norm = RMSNorm(model_cfg.q_lora_rank, eps=self.eps)
        self.wq_b = ColumnParallelLinear(
            model_cfg.q_lora_rank,
            self.num_heads * self.head_dim,
            config=col_config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.wkv = ReplicatedLinear(hidden, self.head_dim, init_method=config.init_method, params_dtype=dtype)
        self.kv_norm = RMSNorm(self.head_dim, eps=self.eps)
        # Block-diagonal grouped projection: weight [o_groups * o_lora_rank, heads_per_group * head_dim],
        # split by groups over TP (dim 0). Only its weight is used (see _grouped_output), never its
        # forward: its input is already head-split, so the input copy of ColumnParallelLinear is wrong here.
        self.wo_a = ColumnParallelLinear(
            self.num_heads * self.head_dim // model_cfg.o_groups,
            model_cfg.o_groups * model_cfg.o_lora_rank,
            config=col_config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.wo_b = RowParallelLinear(
            model_cfg.o_groups * model_cfg.o_lora_rank,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.attn_sink = nn.Parameter(torch.zeros(self.num_local_heads, dtype=torch.float32))
        tensor_parallel.set_tensor_model_parallel_attributes(self.attn_sink, True, 0, 1)

        self.compressor: Optional[Compressor] = None
        self.indexer: Optional[LightningIndexer] = None
        if self.ratio > 0:
            self.compressor = Compressor(
                hidden_size=hidden,
                head_dim=self.head_dim,
                ratio=self.ratio,
                rotary=self.rotary,
                eps=self.eps,
                init_method=config.init_method,
                params_dtype=dtype,
            )
        if self.ratio == CSA_RATIO:
            self.indexer = LightningIndexer(config=config, model_cfg=model_cfg, rotary=self.rotary)
        # dense | warmup | sparse; switched at stage boundaries of a staged run (train/stages.py).
        self.indexer_phase = model_cfg.indexer_phase

    # ------------------------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None, cp=None,
        documents: Optional[Documents] = None,
    ) -> torch.Tensor:
        """hidden_states: [s, b, hidden] (already RMS-normed) -> [s, b, hidden]; cp: this rank's
        `ContextParallelSlice` or None (s is then the local slice, position_ids its global positions);
        documents: the packed documents of the micro-batch (`model/documents.py`) or None (each row is
        one sequence). With documents, RoPE positions restart per document and position_ids is unused."""
        x = hidden_states
        if self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        seq_len, batch, _ = x.shape
        if documents is not None:
            positions = documents.positions[:, documents.local]  # [B, T], restarting per document
        else:
            positions = self._positions(position_ids, seq_len, x.device)
        cos, sin = rope_tables(self.rotary, positions)  # [T, B | 1, r/2]

        c_q = self.q_norm(self.wq_a(x))  # [T, B, q_lora_rank]
        q = self.wq_b(c_q)[0].view(seq_len, batch, self.num_local_heads, self.head_dim)
        q = apply_interleaved_rope(rms_normalize(q, self.eps), cos[:, :, None], sin[:, :, None])
        q = q.permute(1, 2, 0, 3)  # [B, H_local, T, c]

        kv = self._window_kv(x, cos, sin)  # [B, T, c]
        halo = previous = None
        if cp is not None:
            halo = cp_context.previous_rows(x, cp)  # [h, B, hidden]
            halo_positions = cp.halo_positions.to(x.device) if documents is None else documents.halo_positions(cp.halo)
            halo_cos, halo_sin = rope_tables(self.rotary, halo_positions)
            kv = torch.cat((self._window_kv(halo, halo_cos, halo_sin), kv), dim=1)  # [B, h + T, c]
            if cp.rank > 0:
                previous = halo[halo.shape[0] - CSA_RATIO :]  # the block before ours (overlapping compressors)
        blocks = documents.blocks(self.ratio) if documents is not None and self.ratio else None
        layout = KeyLayout(
            self.window, halo=cp.halo if cp else 0, offset=cp.offset if cp else 0, ratio=self.ratio,
            documents=DocumentMasks.of(documents, blocks) if documents is not None else None,
        )
        # Packed documents under CP: blocks start anywhere; each rank compresses the blocks that end
        # on it from its halo + rows, and the entries are summed over ranks (model/documents.py).
        extended = None
        if blocks is not None and cp is not None:
            extended = (torch.cat((halo, x)), (cp.offset - cp.halo, cp.offset, cp.offset + seq_len))

        compressed = indexer_keys = None
        if self.compressor is not None:
            if extended is not None:
                compressed, indexer_keys = self._sum_owned_entries(extended, positions, blocks, cp)
            else:
                compressed = self.compressor(x, positions, previous=previous, blocks=blocks)  # [B, N, c]
                if cp is not None:
                    compressed = cp_context.gather_entries(compressed, cp)  # every entry of the sequence
            compressed = copy_to_tp_region(compressed, self.wq_b.tp_group).to(kv.dtype)

        # The indexer's extra inputs: the CP previous block, the keys already summed over CP (documents).
        inputs = (x, c_q, q, kv, compressed, positions, (previous, indexer_keys), layout, cp)
        if self.backend(x.device, seq_len=seq_len, batch=batch) == "dense":
            out, indexer_loss = self._dense_core(*inputs)
        else:
            out, indexer_loss = self._sparse_core(*inputs)

        out = apply_interleaved_rope(out.permute(2, 0, 1, 3), cos[:, :, None], sin[:, :, None], inverse=True)
        output = self.wo_b(self._grouped_output(out))[0]  # [s, b, hidden]
        if indexer_loss is not None:
            output = aux_losses.attach(output, indexer_loss, name=INDEXER_LOSS_NAME)
        return output

    # ------------------------------------------------------------------------------------------
    def _dense_core(self, x, c_q, q, kv, compressed, positions, indexer_inputs, layout, cp):
        """Reference: one [B, H, T, T+N] masked score tensor (kept for backward)."""
        seq_len, batch = x.shape[:2]
        allowed = window_mask(seq_len, self.window, x.device, halo=layout.halo, offset=layout.offset)  # [T, h+T]
        docs = layout.documents
        if docs is not None:  # [B, T, h + T], global indices
            queries = torch.arange(seq_len, device=x.device) + layout.offset
            keys = torch.arange(kv.shape[1], device=x.device) + layout.offset - layout.halo
            allowed = allowed & docs.documents.same_document_at(queries, keys)
        num_window_keys = kv.shape[1]
        scores = support = None
        if compressed is not None:
            if docs is not None:
                local = slice(layout.offset, layout.offset + seq_len)
                visible = docs.blocks.visible(docs.documents, local, compressed.shape[1])  # [B, T, N]
            else:
                visible = compressed_visibility(  # [T, N]
                    seq_len, self.ratio, x.device, offset=layout.offset, num_entries=compressed.shape[1]
                )
            support = visible
            if self.indexer is not None and self._phase() != "dense":
                scores = self.indexer.scores(
                    x, c_q, positions, visible, previous=indexer_inputs[0], cp=cp, blocks=layout.blocks,
                    precomputed=indexer_inputs[1],
                )  # [B, T, N]
                if self._phase() == "sparse":
                    support = self.indexer.select(scores, visible)
            kv = torch.cat((kv, compressed), dim=1)
            if support.dim() == 3:
                allowed = torch.cat((allowed.expand(batch, -1, -1), support.expand(batch, -1, -1)), dim=-1)
            else:
                allowed = torch.cat((allowed, support), dim=-1)

        out, probs = joint_softmax_attention(q, kv, allowed, self.attn_sink, self.scale)

        indexer_loss = None
        if scores is not None and self.training and torch.is_grad_enabled():
            # Main attention mass per compressed entry, summed over all heads (all TP ranks).
            mass = probs.detach()[..., num_window_keys:].sum(dim=1)  # [B, T, N]
            mass = reduce_from_tp_region(mass, self.wq_b.tp_group)
            support_full = support if support.dim() == 3 else support.expand(batch, -1, -1)
            # Under CP: this rank's share (its rows over the CP-global row count).
            indexer_loss = self.model_cfg.indexer_loss_coeff * indexer_kl_loss(scores, mass, support_full, cp=cp)
        return out, indexer_loss

    def _sparse_core(self, x, c_q, q, kv, compressed, positions, indexer_inputs, layout, cp):
        """Blockwise / flex: nothing of size T x T (or T x N x heads) is kept; same results."""
        block = self.model_cfg.attention_block_size
        use_indexer = self.indexer is not None and self._phase() != "dense"
        keys = topk = None
        if use_indexer:
            keys = self.indexer.keys(  # [B, N, cI]
                x, positions, indexer_inputs[0], cp, blocks=layout.blocks, precomputed=indexer_inputs[1]
            )
            if self._phase() == "sparse":
                topk = self.indexer.select_topk(x, c_q, positions, keys, layout, block)  # [B, T, k]
        q = q.contiguous()
        if self.backend(q.device) == "flex" and topk is None:
            out, lse = flex_joint_attention(q, kv, compressed, self.attn_sink, self.scale, layout)
        else:
            out, lse = blockwise_attention(
                q, kv, compressed, self.attn_sink, self.scale, layout, topk=topk, block_size=block
            )
        indexer_loss = None
        if use_indexer and self.training and torch.is_grad_enabled():
            main = MainAttention(q, compressed, lse, self.scale)
            indexer_loss = self.model_cfg.indexer_loss_coeff * self.indexer.kl_loss_blockwise(
                x, c_q, positions, keys, main, layout, topk, cp=cp, block_size=block
            )
        return out, indexer_loss

    # ------------------------------------------------------------------------------------------
    def backend(self, device: torch.device, *, seq_len: int = 0, batch: int = 1) -> str:
        """The core attention implementation used for `seq_len` queries x `batch` on `device`."""
        one_block = self.backend_choice == "auto" and 0 < seq_len and auto_runs_dense(
            self.model_cfg, ratio=self.ratio, seq_len=seq_len, batch=batch,
            tp=self.config.tensor_model_parallel_size, phase=self._phase(),
        )
        return resolve_backend(self.backend_choice, device, one_block=one_block)

    def _sum_owned_entries(self, extended, positions, blocks, cp):
        """Packed documents under CP: this rank compresses the blocks that end on it (from its halo +
        rows); ONE sum over the CP ranks carries the main entries and the indexer keys together, so
        every rank runs the same collectives in backward in the same order. -> (main [B, N, c],
        indexer keys [B, N, cI] or None)."""
        rows, span = extended
        parts = [self.compressor(rows, positions, blocks=blocks, span=span)]
        if self.indexer is not None and self._phase() != "dense":
            parts.append(self.indexer.compressor(rows.detach(), positions, blocks=blocks, span=span))
        summed = cp_context.sum_entries(torch.cat([at_least_fp32(p) for p in parts], dim=-1), cp)
        main = summed[..., : self.head_dim].to(parts[0].dtype)
        keys = summed[..., self.head_dim :].to(parts[-1].dtype) if len(parts) > 1 else None
        return main, keys

    def _window_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, B, hidden] -> the single K=V head [B, T, c] (normed, RoPE tables [T, B | 1, r/2])."""
        kv = apply_interleaved_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [T, B, c]
        return copy_to_tp_region(kv, self.wq_b.tp_group).transpose(0, 1)

    def _grouped_output(self, out: torch.Tensor) -> torch.Tensor:
        """[T, B, H_local, c] -> [T, B, groups_local * o_lora_rank] via per-group wo_a blocks."""
        seq_len, batch = out.shape[:2]
        grouped = out.reshape(seq_len, batch, self.num_local_groups, -1)
        weight = self.wo_a.weight.view(self.num_local_groups, self.model_cfg.o_lora_rank, -1)
        return torch.einsum("tbgi,gri->tbgr", grouped, weight).flatten(2)

    def _positions(self, position_ids: Optional[torch.Tensor], seq_len: int, device) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(seq_len, device=device)
        if position_ids.shape != (seq_len,):
            raise ValueError(
                f"position_ids must be a 1-D tensor of length s={seq_len} (one absolute position per "
                f"token, shared by the batch); got shape {tuple(position_ids.shape)}."
            )
        return position_ids.to(device)

    def _phase(self) -> str:
        return self.indexer_phase

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Default Megatron handling, except `attn_sink`, which is split by heads over TP."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state.update(
            make_sharded_tensors_for_checkpoint(
                {"attn_sink": self.attn_sink},
                prefix,
                {"attn_sink": 0},
                sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        return state


def _validate(config: TransformerConfig, model_cfg: ModelConfig, layer_index: int) -> None:
    if not 0 <= layer_index < len(model_cfg.compress_ratios):
        raise ValueError(
            f"layer_index={layer_index} is outside model.compress_ratios (length "
            f"{len(model_cfg.compress_ratios)}: one entry per main layer plus one per MTP layer)."
        )
    if config.hidden_size != model_cfg.hidden_size or config.num_attention_heads != model_cfg.num_attention_heads:
        raise ValueError(
            f"TransformerConfig (hidden_size={config.hidden_size}, num_attention_heads="
            f"{config.num_attention_heads}) disagrees with the model config (hidden_size="
            f"{model_cfg.hidden_size}, num_attention_heads={model_cfg.num_attention_heads}); build both "
            f"from the same model config."
        )
    tp = config.tensor_model_parallel_size
    heads, groups = model_cfg.num_attention_heads, model_cfg.o_groups
    if heads % groups or groups % tp:
        raise ValueError(
            f"num_attention_heads={heads} must be divisible by o_groups={groups}, and o_groups by the "
            f"tensor-parallel size {tp} (heads are split by whole output groups); change model.o_groups "
            f"or the TP size."
        )
    if model_cfg.head_dim < model_cfg.qk_rope_head_dim:
        raise ValueError(
            f"head_dim={model_cfg.head_dim} must be >= qk_rope_head_dim={model_cfg.qk_rope_head_dim}."
        )
    if model_cfg.indexer_phase not in INDEXER_PHASES:
        raise ValueError(
            f"model.indexer_phase={model_cfg.indexer_phase!r} is not one of {INDEXER_PHASES}: 'dense' "
            f"(CSA attends to all visible compressed entries, no indexer loss), 'warmup' (dense attention "
            f"+ dense indexer KL) or 'sparse' (top-k attention + sparse indexer KL)."
        )
    if model_cfg.sliding_window < 1:
        raise ValueError(f"model.sliding_window={model_cfg.sliding_window} must be >= 1.")
