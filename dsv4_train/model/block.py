"""One V4 transformer block (paper §2): mHC-wrapped, pre-norm attention and MoE sub-layers.

Megatron's `TransformerLayer` assumes a [s, b, d] residual; V4's residual is `hc_mult` streams
[s, b, n, d] mixed by mHC, so the block is ours, built from Megatron parts (`MoELayer`) plus the
hybrid attention, `HyperConnection` and DeepSeek's RMSNorm.

    x_in, post, comb = hc_attn.pre(X);  X = hc_attn.post(attn(attn_norm(x_in)), X, post, comb)
    x_in, post, comb = hc_ffn.pre(X);   X = hc_ffn.post(ffn(ffn_norm(x_in), ids), X, post, comb)
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from dsv4_train.config.model import ModelConfig
from dsv4_train.model import recompute
from dsv4_train.model.block_compile import compile_block
from dsv4_train.model.primitives import RMSNorm
from dsv4_train.model.mhc import HyperConnection
from dsv4_train.model.moe import V4MoELayer


def rms_norm(config, model_cfg: ModelConfig, size: Optional[int] = None):
    """DeepSeek's RMSNorm (fp32 statistics and weight) with V4's epsilon.

    Not Megatron's `WrappedTorchNorm`: that one asserts when sequence parallelism is on (only TE
    norms support it upstream). Under SP each TP rank normalises its own sequence shard, so the
    weight's gradient is partial per rank: tagging it `sequence_parallel` makes Megatron's
    `finalize_model_grads` all-reduce it over TP, exactly as for TE norms.
    """
    norm = RMSNorm(size or config.hidden_size, eps=model_cfg.rms_norm_eps)
    norm.weight.sequence_parallel = bool(config.sequence_parallel)
    return norm


class V4Block(MegatronModule):
    """`layer_index` is the 0-based index into `model_cfg.compress_ratios` (MTP blocks follow the
    main layers); it selects the attention mode and whether routing is hashed."""

    def __init__(self, *, config, model_cfg: ModelConfig, layer_index: int):
        super().__init__(config=config)
        from dsv4_train.model.attention import HybridAttention  # the teammate's module

        schedule = model_cfg.layer_schedule()[layer_index]
        self.layer_index = layer_index
        self.is_mtp = schedule["is_mtp"]
        hc_kwargs = dict(
            hc_mult=model_cfg.hc_mult,
            sinkhorn_iters=model_cfg.hc_sinkhorn_iters,
            hc_eps=model_cfg.hc_eps,
            norm_eps=model_cfg.rms_norm_eps,
            sinkhorn_kernel=model_cfg.sinkhorn_kernel,
        )
        self.hc_attn = HyperConnection(config=config, **hc_kwargs)
        self.attn_norm = rms_norm(config, model_cfg)
        self.attn = HybridAttention(config=config, model_cfg=model_cfg, layer_index=layer_index)
        self.hc_ffn = HyperConnection(config=config, **hc_kwargs)
        self.ffn_norm = rms_norm(config, model_cfg)
        self.ffn = V4MoELayer(
            config=config,
            model_cfg=model_cfg,
            # Megatron layer numbers are 1-based and, for MTP layers, counted within the MTP block
            # (the router adds config.num_layers itself when logging).
            layer_number=layer_index + 1 - (model_cfg.num_layers if self.is_mtp else 0),
            hash_routed=schedule["hash_routed"],
            is_mtp_layer=self.is_mtp,
        )
        if model_cfg.compile:
            compile_block(self, model_cfg.compile_backend)

    def forward(
        self,
        streams: torch.Tensor,
        *,
        token_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cp=None,
        documents=None,
    ) -> torch.Tensor:
        """streams [s, b, n, d], token_ids [s, b], position_ids [s] or None -> [s, b, n, d];
        cp: this rank's `ContextParallelSlice` (parallel/context.py) or None; documents: the packed
        documents (model/documents.py) or None."""
        drop = recompute.active(self.config, "mhc")
        (x, post, mixed), dropped = recompute.run_dropping_outputs(drop, self._attn_input, streams)
        attn_out = self.attn(x, position_ids=position_ids, cp=cp, documents=documents)
        streams = HyperConnection.expand(attn_out, mixed, post)
        recompute.release(dropped, streams)  # before the expansion's backward reads post

        (x, post, mixed), dropped = recompute.run_dropping_outputs(drop, self._ffn_input, streams)
        ffn_out = self.ffn(x, token_ids=token_ids)
        streams = HyperConnection.expand(ffn_out, mixed, post)
        recompute.release(dropped, streams)
        return streams

    def _attn_input(self, streams: torch.Tensor):
        """Everything of the attention sub-layer's mHC that reads only `streams`: (normed input,
        post, mixed streams). The stream mixing is in here so that the streams' gradient sums its
        parts in the same order with and without recompute (bitwise-equal gradients)."""
        x_in, post, comb = self.hc_attn.pre(streams)
        return self.attn_norm(x_in), post, HyperConnection.mix(streams, comb)

    def _ffn_input(self, streams: torch.Tensor):
        x_in, post, comb = self.hc_ffn.pre(streams)
        return self.ffn_norm(x_in), post, HyperConnection.mix(streams, comb)
