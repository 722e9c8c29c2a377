"""Muon for hidden matrices, AdamW for the rest, in one torch optimizer (paper §2.4, Algorithm 1).

Split: AdamW for the embedding, the output head, RMSNorm weights, mHC biases (`base`) and gates
(`scale`), attention sinks and compressor position biases (`ape`; the paper is silent on sinks and
`ape`, AdamW is the natural choice for biases); Muon for every other 2-D matrix, mHC `fn` included.
Expert biases are buffers updated by the load balancer, not parameters.

Each logically independent matrix is orthogonalised on its own: every routed expert is its own
parameter, or one slice of the grouped experts' stacked `fc1_weight` [experts, 2f, d] / `fc2_weight`
[experts, d, f] (model/grouped_experts.py); a fused SwiGLU `linear_fc1` (or fc1 slice) is split into its
gate and up halves; the grouped `wo_a` into its groups. A parameter's matrices are one stack
[matrices, rows, cols], orthogonalised by one batched Newton-Schulz. Query and indexer projections (`wq_b`, `weights_proj`) are orthogonalised whole, as one
linear map from one input, not per head. A tensor-parallel piece is all-gathered over its TP group
(expert TP for routed experts), orthogonalised as the whole logical matrix, and this rank's slice
is kept, so every TP layout computes the 1-process update. The momentum is elementwise, hence
local. Both halves read `lr` and `weight_decay` of their param group, which Megatron's scheduler sets.

Data parallel (`owners`): gradients are all-reduced, and each whole parameter is assigned to one
owner rank of the data-parallel group it is replicated over (largest first, to the least loaded
rank). Only the owner keeps its optimizer state and computes its update, then broadcasts the new
values; no rank holds the whole model's state (paper §2.4 distributes Muon by whole matrices too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from dsv4_train.model import grouped_checkpoint
from dsv4_train.train.muon_math import scaled_orthogonal

_ADAMW_NAME_PARTS = ("word_embeddings", "output_layer", "attn_sink", ".ape")
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MatrixLayout:
    """How a parameter's local tensor splits into logical matrices (`tensor.reshape(pieces, -1, cols)`:
    consecutive row blocks, across stacked experts too), and how each piece is split over tensor
    parallelism."""

    pieces: int = 1
    partition_dim: Optional[int] = None  # TP split of each piece: 0 rows, 1 columns; None = whole here
    group: Optional[object] = None  # the process group the piece is split over


def _stacked_experts(name: str, param: torch.Tensor) -> bool:
    """The grouped experts' [local experts, rows, cols] weights (model/grouped_experts.py)."""
    return param.dim() == 3 and name.rsplit(".", 1)[-1] in grouped_checkpoint.PROJECTIONS


def uses_muon(name: str, param: torch.Tensor) -> bool:
    """The paper's split by parameter name and rank (see the module docstring)."""
    matrix = param.dim() == 2 or _stacked_experts(name, param)
    return matrix and not any(part in name for part in _ADAMW_NAME_PARTS)


def matrix_layout(name: str, param: torch.Tensor, *, o_groups_local: int) -> MatrixLayout:
    """Logical pieces and TP split of a Muon parameter of the model (`name` from named_parameters)."""
    from megatron.core import parallel_state

    expert = ".experts." in name and ".shared_experts." not in name
    if name.endswith("wo_a.weight"):
        return MatrixLayout(pieces=o_groups_local)  # TP splits whole groups: each piece is local
    experts = param.shape[0] if _stacked_experts(name, param) else 1
    glu = name.endswith("linear_fc1.weight") or name.endswith("fc1_weight")  # [gate; up] on every TP rank
    pieces = experts * (2 if glu else 1)
    if not getattr(param, "tensor_model_parallel", False):
        return MatrixLayout(pieces=pieces)
    group = (parallel_state.get_expert_tensor_parallel_group() if expert
             else parallel_state.get_tensor_model_parallel_group())
    if torch.distributed.get_world_size(group) == 1:
        return MatrixLayout(pieces=pieces)
    # partition_dim counts the stacked experts' leading dim; a piece is one [rows, cols] matrix.
    return MatrixLayout(pieces=pieces, partition_dim=param.partition_dim - (param.dim() - 2), group=group)


@dataclass(frozen=True)
class Owner:
    """The rank that updates a data-parallel replicated parameter and broadcasts it to its group."""

    group: object
    src: int  # global rank of the owner
    mine: bool


def assign_owners(params_and_groups) -> Dict[torch.Tensor, Owner]:
    """[(param, data-parallel group)] -> owner per param: largest first, to the least loaded rank.
    The same on every rank of a TP group (TP shards have equal shapes), as the TP gather needs."""
    items = [(p, g) for p, g in params_and_groups if torch.distributed.get_world_size(g) > 1]
    loads: Dict[int, list] = {}
    owners = {}
    for param, group in sorted(items, key=lambda item: -item[0].numel()):  # stable: ties keep model order
        load = loads.setdefault(id(group), [0] * torch.distributed.get_world_size(group))
        rank = min(range(len(load)), key=load.__getitem__)
        load[rank] += param.numel()
        owners[param] = Owner(group, torch.distributed.get_global_rank(group, rank),
                              rank == torch.distributed.get_rank(group))
    return owners


def _orthogonalise(pieces: torch.Tensor, layout: MatrixLayout, ns_dtype: torch.dtype) -> torch.Tensor:
    """pieces [matrices, rows, cols] (this rank's TP slices) -> their scaled orthogonal updates."""
    if layout.group is None:
        return scaled_orthogonal(pieces, ns_dtype=ns_dtype)
    dim = 1 + layout.partition_dim
    world = torch.distributed.get_world_size(layout.group)
    parts = [torch.empty_like(pieces) for _ in range(world)]
    torch.distributed.all_gather(parts, pieces.contiguous(), group=layout.group)  # one gather per parameter
    whole = scaled_orthogonal(torch.cat(parts, dim=dim), ns_dtype=ns_dtype)
    return whole.chunk(world, dim=dim)[torch.distributed.get_rank(layout.group)]


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps the parameters in `layouts` with Muon and every other parameter with AdamW.

    State per parameter: `step` (shared count, as Megatron's checkpoints expect) plus
    `momentum_buffer` (Muon) or `exp_avg` / `exp_avg_sq` (AdamW)."""

    def __init__(self, param_groups: Iterable[dict], layouts: Dict[torch.Tensor, MatrixLayout], *, lr: float,
                 weight_decay: float, betas: Tuple[float, float], eps: float, momentum: float,
                 ns_dtype: torch.dtype = torch.float32, owners: Optional[Dict[torch.Tensor, Owner]] = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        super().__init__(list(param_groups), defaults)
        self.layouts = layouts
        self.owners = owners or {}
        self.momentum = momentum
        self.ns_dtype = ns_dtype

    def init_state(self, optimizer=None, config=None) -> None:
        """Allocate every state tensor (Megatron calls this before loading a checkpoint into it)."""
        for param in self._owned():
            self._state_of(param)

    def _owned(self):
        for group in self.param_groups:
            for param in group["params"]:
                owner = self.owners.get(param)
                if owner is None or owner.mine:
                    yield param

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            if param in self.layouts:
                state["momentum_buffer"] = torch.zeros_like(param)
            else:
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                owner = self.owners.get(param)
                if param.grad is None or (owner is not None and not owner.mine):
                    continue
                state = self._state_of(param)
                state["step"] += 1
                if param in self.layouts:
                    self._muon(param, state, group)
                else:
                    self._adamw(param, state, group)
        for group in self.param_groups:
            for param in group["params"]:
                owner = self.owners.get(param)
                if owner is not None and param.grad is not None:
                    torch.distributed.broadcast(param.data, src=owner.src, group=owner.group)
        return loss

    def _muon(self, param, state, group) -> None:
        grad, momentum, layout = param.grad, state["momentum_buffer"], self.layouts[param]
        momentum.mul_(self.momentum).add_(grad)
        direction = grad + self.momentum * momentum  # Nesterov
        pieces = direction.reshape(layout.pieces, -1, direction.shape[-1])
        update = _orthogonalise(pieces, layout, self.ns_dtype).reshape(param.shape)
        param.mul_(1.0 - group["lr"] * group["weight_decay"]).sub_(update.to(param.dtype), alpha=group["lr"])

    def _adamw(self, param, state, group) -> None:
        beta1, beta2 = group["betas"]
        grad, step = param.grad, float(state["step"])
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1.0 - beta1 ** step))
