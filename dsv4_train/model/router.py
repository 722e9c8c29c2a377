"""V4 routers (paper §2.1, §4.2.1).

* Scored layers use Megatron-Core's `TopKRouter` (only its same-dtype gate call is made plain):
  sqrtsoftplus scores, the expert bias used for selection only, normalised top-k weights times
  `routed_scaling_factor`, the sequence-wise balance loss, and the `expert_bias` /
  `local_tokens_per_expert` buffers that Megatron's `finalize_model_grads` updates once per global
  batch.
* Hash layers (the first `num_hash_layers`) need what Megatron lacks: experts chosen by a fixed
  `tid2eid[token_id]` table. `HashRouter` keeps Megatron's `Router` gate (learned weight, fp32
  gating) and reuses `topk_routing_with_score_function(precomputed_indices=...)` for the weights.
  It deliberately has no `expert_bias` attribute: `finalize_model_grads` selects routers by
  `hasattr(module, "expert_bias")`, so hash layers take no part in the bias update.

A float64 model routes in float64 (gate and scores): Megatron computes router scores in fp32
whatever the logits' dtype, which would put fp32 rounding into an otherwise fp64 forward (the fp64
document-isolation check in tests/model/test_documents.py needs none). Training forwards of scored
layers keep Megatron's path (its auxiliary losses).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import Router, TopKRouter

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class _PlainGatingWhenSameDtype:
    """Mixin for Megatron routers: when input and gate weight are already in the router dtype
    (fp32 runs), the gate is a plain `F.linear`. Megatron's `RouterGatingLinearFunction` computes
    the same `torch.mm` inside a custom autograd Function, whose point is to avoid saving fp32
    copies of bf16 inputs; with fp32 inputs there is nothing to save, only ~60 us of Python per
    call. Mixed precision keeps Megatron's path."""

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        router_dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        if input.dtype == torch.float64:  # a float64 model gates in float64 (module doc)
            router_dtype = torch.float64
        weight = self.weight
        if (self.bias is None and input.dtype == router_dtype and weight.dtype == router_dtype
                and weight.device == input.device):  # else Megatron's (it also moves a CPU weight)
            return torch.nn.functional.linear(input, weight)
        return super().gating(input)


class _CountsTokensPerStep:
    """Mixin: tokens routed to each expert since the last `take_step_counts()` (training forwards
    only, as Megatron counts for the bias update), for the per-step load telemetry
    (train/telemetry.py). Megatron's own `local_tokens_per_expert` is emptied by the bias update
    inside the step and exists on scored layers only."""

    @torch.compiler.disable  # attribute bookkeeping: eager inside a compiled block (model.compile)
    def _count(self, routing_map: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                counts = routing_map.sum(dim=0).to(torch.float64)
                if getattr(self, "_step_counts", None) is None:
                    self._step_counts = counts
                else:
                    self._step_counts += counts

    def take_step_counts(self) -> Optional[torch.Tensor]:
        """[experts] float64 tokens routed since the last call (None if no training forward ran)."""
        counts, self._step_counts = getattr(self, "_step_counts", None), None
        return counts


def float64_topk_routing(logits: torch.Tensor, topk: int, *, score_function: str, scaling_factor: Optional[float],
                         expert_bias: Optional[torch.Tensor] = None, precomputed_indices: Optional[torch.Tensor] = None):
    """Megatron's `topk_routing_with_score_function` (the V4 subset: sigmoid / sqrtsoftplus scores,
    top-k after the expert bias or precomputed experts, normalised, scaled) with the scores in the
    float64 of `logits` [tokens, E] -> (probs [tokens, E], routing_map [tokens, E] bool)."""
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    elif score_function == "sqrtsoftplus":
        scores = torch.nn.functional.softplus(logits).sqrt()
    else:
        raise ValueError(f"float64 routing implements sigmoid and sqrtsoftplus scores, not {score_function!r}")
    if precomputed_indices is not None:
        top_indices = precomputed_indices
    else:
        biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        top_indices = torch.topk(biased, k=topk, dim=1, sorted=torch.is_grad_enabled())[1]
    chosen = torch.gather(scores, dim=1, index=top_indices)
    probs = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else chosen
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


class ScoredRouter(_CountsTokensPerStep, _PlainGatingWhenSameDtype, TopKRouter):
    """Scored V4 layers: Megatron's `TopKRouter` (gate fast path above), counting tokens per step;
    float64 forwards without auxiliary losses (and without group-limited routing or token
    dropping, which V4 does not use) route in float64 (module doc)."""

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        config = self.config
        plain = not (config.moe_router_num_groups or config.moe_expert_capacity_factor is not None)
        if logits.dtype == torch.float64 and plain and not (self.training and torch.is_grad_enabled()):
            probs, routing_map = float64_topk_routing(
                logits.view(-1, config.num_moe_experts), self.topk, score_function=self.score_function,
                scaling_factor=config.moe_router_topk_scaling_factor, expert_bias=self.expert_bias)
        else:
            probs, routing_map = super().routing(logits, *args, **kwargs)
        self._count(routing_map)
        return probs, routing_map


def build_hash_table(*, vocab_size: int, num_experts: int, topk: int, seed: int) -> torch.Tensor:
    """Deterministic token -> experts table [vocab, topk] (int64) for from-scratch training.

    Token v (in a seeded random order r(v)) takes the `topk` consecutive entries starting at
    r(v)*topk (mod E) of a seeded permutation of the experts: the experts of one token are distinct
    (topk <= E consecutive positions of a permutation) and every expert gets floor or ceil of
    vocab*topk/E tokens (the windows tile the circle of experts evenly).
    """
    if topk > num_experts:
        raise ValueError(
            f"model.num_experts_per_tok={topk} exceeds model.num_routed_experts={num_experts}; "
            "a token cannot be hash-routed to more distinct experts than exist."
        )
    generator = torch.Generator().manual_seed(seed)
    expert_perm = torch.randperm(num_experts, generator=generator)
    token_rank = torch.randperm(vocab_size, generator=generator)
    starts = token_rank * topk  # [V]
    slots = (starts.unsqueeze(1) + torch.arange(topk).unsqueeze(0)) % num_experts  # [V, K]
    return expert_perm[slots].to(torch.int64)


class HashRouter(_CountsTokensPerStep, _PlainGatingWhenSameDtype, Router):
    """Router whose expert choice is `tid2eid[token_id]`; only the combine weights are learned.

    The MoE layer hands the token ids ([s, b], same layout and split as the hidden states) to
    `set_token_ids` right before routing.
    """

    def __init__(self, *, config, pg_collection=None, is_mtp_layer: bool = False, vocab_size: int, hash_seed: int):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.topk = config.moe_router_topk
        table = build_hash_table(
            vocab_size=vocab_size, num_experts=config.num_moe_experts, topk=self.topk, seed=hash_seed
        )
        # Persistent: saved in checkpoints (official name `gate.tid2eid`), never trained.
        self.register_buffer("tid2eid", table, persistent=True)
        self._token_ids: Optional[torch.Tensor] = None

    def set_token_ids(self, token_ids: torch.Tensor) -> None:
        self._token_ids = token_ids

    def routing(self, logits: torch.Tensor, token_ids: torch.Tensor):
        """logits [s, b, E], token_ids [s, b] -> (probs [s*b, E], routing_map [s*b, E])."""
        logits = logits.view(-1, self.config.num_moe_experts)
        experts = self.tid2eid[token_ids.reshape(-1)].long()  # [s*b, K]
        route = float64_topk_routing if logits.dtype == torch.float64 else topk_routing_with_score_function
        probs, routing_map = route(
            logits,
            self.topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.config.moe_router_score_function,
            precomputed_indices=experts,
        )
        self._count(routing_map)
        return probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        token_ids = self._token_ids
        if token_ids is None:
            raise RuntimeError("HashRouter needs the token ids: call set_token_ids() before routing")
        assert token_ids.shape == input.shape[:-1], (token_ids.shape, input.shape)
        self._token_ids = None  # one use per forward: a stale id tensor must never be reused
        return self.routing(self.gating(input), token_ids)
