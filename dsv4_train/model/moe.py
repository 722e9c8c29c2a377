"""V4 MoE sub-layer (paper §2.1, §4.2.1) on Megatron-Core's `MoELayer`.

Megatron parts used as they are: `MoELayer` (token dispatcher, EP-ready), routed experts as
`GroupedExperts` (model/grouped_experts.py: stacked weights, grouped GEMMs; the default),
`SequentialMLP` or `BatchedSequentialMLP` (model/experts.py), all with the same checkpoint keys, and
`SharedExpertMLP` built from tensor-parallel linears, whose unfused GLU path applies V4's SwiGLU clamp
(config.activation_func_clamp_value) to routed and shared experts alike, and `TopKRouter` for
scored layers. V4-specific: hash layers route with `HashRouter`, which needs the token ids; the
layer passes them down (`forward(hidden, token_ids=...)`). On a single rank with the grouped or
batched experts, the layer skips the token dispatcher (nothing to exchange; `_forward_single_rank`).

Tensor parallelism without sequence parallelism: Megatron's `MoELayer` refuses it in training
(its dispatchers treat the TP ranks' tokens as distinct), so the layer runs sequence-parallel
inside: it is built with a config copy that has `sequence_parallel=True` (router, dispatcher,
shared expert and experts all read it), scatters the TP-replicated input to this rank's sequence
rows and gathers the output back. Same maths: every token is routed and computed once, by one TP
rank. Gradients: the scatter's backward all-gathers the input gradient (each rank's full,
replicated gradient, as the surrounding non-SP layout expects); the gather's backward splits
(`tensor_parallel_output_grad=False`: the output gradient is already full and identical on every
TP rank, a reduce-scatter would count it tp times). The router weight is tagged
`sequence_parallel` and gets a partial gradient from this rank's rows, but Megatron's
`finalize_model_grads` only sums such tags over TP when the MODEL config is sequence-parallel, so
the layer sums them itself (a gradient hook; see `_sum_partial_grads_over_tp`). The expert-bias
token counts and the sequence balance loss are as under SP: counted per rank and summed over TP
(x CP x DP) by Megatron.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.experts import BatchedSequentialMLP, RecomputingSequentialMLP
from dsv4_train.model.grouped_experts import GroupedExperts
from dsv4_train.model.parallel_linear import ColumnParallelLinear, RowParallelLinear
from dsv4_train.model.router import HashRouter, ScoredRouter


def _mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _shared_experts(*, config, pg_collection, gate, submodules, name=None):
    return SharedExpertMLP(config=config, submodules=submodules, gate=gate, pg_collection=pg_collection, name=name)


_EXPERT_CLASSES = {"grouped": GroupedExperts, "batched": BatchedSequentialMLP, "sequential": RecomputingSequentialMLP}


def _experts_class(model_cfg: ModelConfig, config):
    """The routed-expert module per moe_expert_compute ("auto" = grouped); same checkpoints for all."""
    choice = model_cfg.moe_expert_compute
    return _EXPERT_CLASSES["grouped" if choice == "auto" else choice]


def _sequence_parallel_inside(config) -> bool:
    """True when the model is tensor-parallel without SP: the MoE then runs sequence-parallel inside."""
    return config.tensor_model_parallel_size > 1 and not config.sequence_parallel


def _with_sequence_parallel(config):
    local = copy.copy(config)
    local.sequence_parallel = True
    return local


class V4MoELayer(MoELayer):
    """Routed experts + one shared expert; hash-routed when `hash_routed`."""

    def __init__(self, *, config, model_cfg: ModelConfig, layer_number: int, hash_routed: bool, is_mtp_layer: bool = False):
        if hash_routed:
            router = partial(HashRouter, vocab_size=model_cfg.vocab_size, hash_seed=model_cfg.hash_table_seed + layer_number)
        else:
            router = ScoredRouter
        submodules = MoESubmodules(
            experts=partial(_experts_class(model_cfg, config), submodules=_mlp_submodules()),
            shared_experts=partial(_shared_experts, submodules=_mlp_submodules()),
            router=router,
        )
        # See the module docstring: without SP, the MoE still runs sequence-parallel inside.
        self.scatters_sequence = _sequence_parallel_inside(config)
        moe_config = _with_sequence_parallel(config) if self.scatters_sequence else config
        super().__init__(config=moe_config, submodules=submodules, layer_number=layer_number, is_mtp_layer=is_mtp_layer)
        self.hash_routed = hash_routed
        if self.scatters_sequence:
            self._sum_partial_grads_over_tp()
        self.set_layer_number(layer_number)  # the seq aux-loss tracker logs per layer number
        # One rank holds every expert whole and every token: nothing to dispatch (see
        # `_forward_single_rank`).
        self.dispatch_free = (
            isinstance(self.experts, (GroupedExperts, BatchedSequentialMLP))
            and self.ep_group.size() == 1
            and self.experts.tp_group.size() == 1
            and self.attn_tp_group.size() == 1
            and not self.moe_layer_recompute
            and self.config.moe_expert_capacity_factor is None
            and not self.config.moe_latent_size
            and not self.shared_expert_overlap
        )

    def forward(self, hidden_states: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [s, b, d] (normed), token_ids [s, b] (needed by hash layers) -> [s, b, d]."""
        if self.scatters_sequence:
            # [s, b, d] replicated over TP -> this rank's rows [s/tp, b, d]; backward all-gathers.
            hidden_states = tensor_parallel.scatter_to_sequence_parallel_region(hidden_states, group=self.attn_tp_group)
        if self.hash_routed:
            if token_ids is None:
                raise RuntimeError("hash-routed MoE layer called without token_ids")
            self.router.set_token_ids(self._split_like_hidden(token_ids, hidden_states))
        if self.dispatch_free:
            output = self._forward_single_rank(hidden_states)
        else:
            output, bias = super().forward(hidden_states)
            assert bias is None
        if self.scatters_sequence:
            # [s/tp, b, d] -> [s, b, d] on every TP rank; backward keeps this rank's rows of the
            # (full, TP-identical) output gradient.
            output = tensor_parallel.gather_from_sequence_parallel_region(
                output, tensor_parallel_output_grad=False, group=self.attn_tp_group
            )
        return output

    def _forward_single_rank(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`MoELayer.forward` without the token dispatcher: shared expert, router, then the tokens
        grouped expert-major (token order kept within an expert), the experts, and their
        outputs (already scaled by the routing weight) added back to their tokens in that order:
        the same maths and summation order as Megatron's single-rank dispatch, without its
        bookkeeping (permutation maps, identity collectives: ~0.4 ms per layer at CPU sizes).
        No host sync: every token has exactly top-k experts (no capacity dropping here, see
        `dispatch_free`), so the routed (expert, token) pairs number T * k, known in advance."""
        shared = self.shared_experts(hidden_states) if self.use_shared_expert else None
        probs, routing_map = self.router(hidden_states)  # [T, E] fp32, [T, E] bool
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, d]
        num_tokens = flat.shape[0]
        expert_major = routing_map.t().reshape(-1)  # [E * T]: expert e's tokens at e * T + t
        pairs = num_tokens * self.config.moe_router_topk
        tokens_per_expert = routing_map.sum(0)
        # Checked on the device (no sync): fewer pairs would leave padding indices in `routed`.
        torch._assert_async(tokens_per_expert.sum() == pairs, "a token is not routed to exactly top-k experts")
        routed = torch.nonzero_static(expert_major, size=pairs).squeeze(-1)
        token_idx = routed % num_tokens  # sorted by expert, then token
        expert_out, _ = self.experts(
            flat.index_select(0, token_idx), tokens_per_expert, probs.t().reshape(-1).index_select(0, routed)
        )
        output = flat.new_zeros(flat.shape).index_add_(0, token_idx, expert_out).view(hidden_states.shape)
        return output + shared if shared is not None else output

    def _sum_partial_grads_over_tp(self) -> None:
        """Sum over TP the gradients of the parameters tagged `sequence_parallel` (the router gate).

        Each TP rank sees only its sequence rows, so these gradients are partial; under real SP
        `finalize_model_grads` sums them over TP, but it gates that on the model config's
        `sequence_parallel`, which is False here. The hook sums each micro-batch's gradient before
        it is accumulated (a [experts, hidden] all-reduce per layer and micro-batch).
        """
        group = self.attn_tp_group

        def all_reduce(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=group)
            return grad

        tagged = [p for p in self.parameters() if getattr(p, "sequence_parallel", False)]
        assert tagged, "expected the router gate to be tagged sequence_parallel"
        for param in tagged:
            param.register_hook(all_reduce)

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
