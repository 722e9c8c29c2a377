"""V4 multi-token prediction layer (paper §2.1, §4.2.2).

Megatron-Core 0.19.2's `MultiTokenPredictionLayer` fuses `eh_proj` over a [s, b, d] residual; V4
needs separate `e_proj` / `h_proj`, mHC streams, its own block and its own `hc_head`, so the layer
is ours. Reused from Megatron: the shared embedding / output layer (owned by `LanguageModule`),
`MTPLossAutoScaler` and `MTPLossLoggingHelper` (in the model's MTP loss: CE on tokens t+2, masked,
normalised, weighted by `config.mtp_loss_scaling_factor`, which `DSV4Model.set_mtp_loss_weight`
switches at run time). The token shift is `parallel.context.roll_left` (contiguous CP slices;
Megatron's `roll_tensor` assumes its zigzag split).

    e   = enorm(Embed(ids shifted left by depth+1))            [s, b, d]
    X'  = e_proj(e) (broadcast to the n streams) + h_proj(hnorm(X))   X: previous streams [s, b, n, d]
    X'  = Block(X');   hidden = norm(hc_head(X'))   -> shared output layer
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.block import V4Block, rms_norm
from dsv4_train.model.mhc import HyperHead
from dsv4_train.model.parallel_linear import SameLayoutColumnLinear
from dsv4_train.parallel.context import roll_left


class MTPLayer(MegatronModule):
    def __init__(self, *, config, model_cfg: ModelConfig, depth: int):
        super().__init__(config=config)
        self.depth = depth
        d = config.hidden_size
        self.enorm = rms_norm(config, model_cfg)
        self.hnorm = rms_norm(config, model_cfg)
        # Column-split over TP; the output keeps the residual's layout (sequence-split under SP).
        self.e_proj = SameLayoutColumnLinear(d, d, config=config, init_method=config.init_method)
        self.h_proj = SameLayoutColumnLinear(d, d, config=config, init_method=config.init_method)
        self.block = V4Block(config=config, model_cfg=model_cfg, layer_index=model_cfg.num_layers + depth)
        self.hc_head = HyperHead(
            config=config, hc_mult=model_cfg.hc_mult, hc_eps=model_cfg.hc_eps, norm_eps=model_cfg.rms_norm_eps
        )
        self.norm = rms_norm(config, model_cfg)

    def forward(
        self,
        *,
        streams: torch.Tensor,
        input_ids: torch.Tensor,
        embedding,
        position_ids: Optional[torch.Tensor] = None,
        cp=None,
        documents=None,
        keep: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [s, b, n, d] of the previous depth; input_ids [b, s] as shifted by the previous
        depth (the main input for depth 0); cp: the `ContextParallelSlice` or None. Returns (normed
        hidden [s, b, d] for the output layer, new streams [s, b, n, d], the ids this depth consumed
        [b, s])."""
        # Token t+1+depth at position t; the last position gets a pad id 0 and is masked by the loss.
        shifted_ids = roll_left(input_ids, cp.group if cp is not None else None)
        if keep is not None:  # packed documents: a token of the next document is no input here (pad 0)
            shifted_ids = shifted_ids * keep
        embedded = self.enorm(embedding(input_ids=shifted_ids, position_ids=None))  # [s, b, d]
        e_part, _ = self.e_proj(embedded)
        s, b, n, d = streams.shape
        h_part, _ = self.h_proj(self.hnorm(streams).reshape(s, b * n, d))
        streams = e_part.unsqueeze(-2) + h_part.reshape(s, b, n, d)
        streams = self.block(streams, token_ids=shifted_ids.t(), position_ids=position_ids, cp=cp, documents=documents)
        hidden = self.norm(self.hc_head(streams))
        return hidden, streams, shifted_ids
