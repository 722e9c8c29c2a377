"""V4 MoE sub-layer (spec §6-7) on Megatron-Core's `MoELayer`.

Megatron parts used as they are: `MoELayer` (token dispatcher, EP-ready), `SequentialMLP` experts
and `SharedExpertMLP` built from tensor-parallel linears, whose unfused GLU path applies V4's SwiGLU
clamp (config.activation_func_clamp_value) to routed and shared experts alike, and `TopKRouter` for
scored layers. V4-specific: hash layers route with `HashRouter`, which needs the token ids; the
layer passes them down (`forward(hidden, token_ids=...)`).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.router import HashRouter, ScoredRouter


def _mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _shared_experts(*, config, pg_collection, gate, submodules, name=None):
    return SharedExpertMLP(config=config, submodules=submodules, gate=gate, pg_collection=pg_collection, name=name)


class V4MoELayer(MoELayer):
    """Routed experts + one shared expert; hash-routed when `hash_routed`."""

    def __init__(self, *, config, model_cfg: ModelConfig, layer_number: int, hash_routed: bool, is_mtp_layer: bool = False):
        if hash_routed:
            router = partial(HashRouter, vocab_size=model_cfg.vocab_size, hash_seed=model_cfg.hash_table_seed + layer_number)
        else:
            router = ScoredRouter
        submodules = MoESubmodules(
            experts=partial(SequentialMLP, submodules=_mlp_submodules()),
            shared_experts=partial(_shared_experts, submodules=_mlp_submodules()),
            router=router,
        )
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, is_mtp_layer=is_mtp_layer)
        self.hash_routed = hash_routed
        self.set_layer_number(layer_number)  # the seq aux-loss tracker logs per layer number

    def forward(self, hidden_states: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [s, b, d] (normed), token_ids [s, b] (needed by hash layers) -> [s, b, d]."""
        if self.hash_routed:
            if token_ids is None:
                raise RuntimeError("hash-routed MoE layer called without token_ids")
            self.router.set_token_ids(self._split_like_hidden(token_ids, hidden_states))
        output, bias = super().forward(hidden_states)
        assert bias is None
        return output

    def _split_like_hidden(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token ids [s, b] -> this rank's sequence-parallel chunk [s/tp, b], the rows of `hidden_states`.

        Under sequence parallelism the hidden states are split along the sequence over TP ranks
        (Megatron's `scatter_to_sequence_parallel_region`: rank r holds rows [r*s/tp, (r+1)*s/tp));
        the ids the model hands down cover the whole (CP-local) sequence, so they are split the same way.
        """
        if token_ids.shape[0] == hidden_states.shape[0]:
            return token_ids
        tp_group = self.attn_tp_group  # the group the hidden states are sequence-split over
        rows = hidden_states.shape[0]
        assert self.config.sequence_parallel and token_ids.shape[0] == rows * tp_group.size(), (
            tuple(token_ids.shape), tuple(hidden_states.shape), tp_group.size())
        rank = tp_group.rank()
        return token_ids[rank * rows : (rank + 1) * rows]
