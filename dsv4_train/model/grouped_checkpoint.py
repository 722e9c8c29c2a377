"""Checkpoint keys of the stacked expert weights (model/grouped_experts.py) = `SequentialMLP`'s.

Megatron-Core's `SequentialMLP.sharded_state_dict` (transformer/moe/experts.py) stores local expert
i of an EP rank as a shard of one global tensor per projection, `{prefix}experts.linear_fc1.weight`
[global experts, 2f, d] (fc1 further split into its gate and up halves by
`apply_swiglu_sharded_factory`, each TP-sharded on dim 0) and `{prefix}experts.linear_fc2.weight`
[global experts, d, f] (TP-sharded on dim 1), plus one `_extra_state` object per expert linear.

Here one `ShardedTensorFactory` per stacked parameter builds exactly those per-expert shards as
views of the [local experts, ...] parameter and stacks them back when loading (the same pattern as
Megatron's former `GroupedMLP`). The factory's `data` IS the parameter, so Megatron's optimizer
checkpointing (`get_param_id_to_sharded_param_map`, `make_sharded_optimizer_tensor`) maps the
parameter's Adam moments through the same factory: the optimizer state keeps the per-expert keys too.

The plain torch `state_dict` likewise lists per-expert keys (`local_experts.{i}.linear_fc1.weight`,
what the HF bridge and `SequentialMLP` use); loading accepts those or the stacked names.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

# stacked parameter name -> (per-expert linear name, TP-sharded axis of one expert's weight)
PROJECTIONS = {"fc1_weight": ("linear_fc1", 0), "fc2_weight": ("linear_fc2", 1)}


def expert_weight_factory(param: torch.Tensor, *, key: str, linear: str, tp_axis: int, sharded_offsets: tuple,
                          first_expert: int, num_global_experts: int, glu: bool, tp_group, dp_rank: int) -> ShardedTensorFactory:
    """One factory for `param` [local experts, ...] whose shards are SequentialMLP's per-expert ones."""
    ep_axis = len(sharded_offsets)

    def offsets(i: int) -> tuple:
        return (*sharded_offsets, (ep_axis, first_expert + i, num_global_experts))

    @torch.no_grad()
    def build(key: str, data: torch.Tensor, replica_id, flattened_range) -> List:
        assert flattened_range is None, "stacked experts support the fully reshardable optimizer format only"
        shards = []
        for i in range(data.shape[0]):
            shard = make_tp_sharded_tensor_for_checkpoint(data[i], key, tp_axis, replica_id=replica_id,
                                                          prepend_offsets=offsets(i), tp_group=tp_group)
            if glu:
                shards.extend(apply_swiglu_sharded_factory(shard, offsets(i), tp_group=tp_group).build())
            else:
                shards.append(shard)
        return shards

    def merge(loaded: List[torch.Tensor]) -> torch.Tensor:
        per_expert = 2 if glu else 1
        return torch.stack([torch.cat(loaded[i:i + per_expert], dim=0) for i in range(0, len(loaded), per_expert)])

    # Replica id as SequentialMLP sets it: (PP, TP) from the TP-sharded helper, DP = the expert-DP rank.
    probe = make_tp_sharded_tensor_for_checkpoint(param[0], key, tp_axis, prepend_offsets=offsets(0), tp_group=tp_group)
    replica_id = (*probe.replica_id[:2], dp_rank)
    return ShardedTensorFactory(key, param, build, merge, replica_id)


def extra_state_objects(*, state_prefix: str, key_prefix: str, linear: str, sharded_offsets: tuple,
                        num_local_experts: int, first_expert: int, num_global_experts: int,
                        tp_rank: int, dp_rank: int) -> Dict[str, ShardedObject]:
    """The (empty) `_extra_state` objects SequentialMLP's expert linears save, one per expert."""
    objects = {}
    for i in range(num_local_experts):
        offsets = sorted((*sharded_offsets, (len(sharded_offsets), first_expert + i, num_global_experts)))
        shape, offset = zip(*[(count, index) for _, index, count in offsets])
        objects[f"{state_prefix}local_experts.{i}.{linear}._extra_state"] = ShardedObject(
            f"{key_prefix}experts.{linear}._extra_state", None, tuple(shape), tuple(offset), (0, tp_rank, dp_rank))
    return objects


_PER_EXPERT = re.compile(r"^local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|_extra_state)$")


def stack_per_expert_keys(state_dict: dict, prefix: str, num_local_experts: int,
                          error: Callable[[str], None]) -> None:
    """In place: `{prefix}local_experts.{i}.linear_fcN.weight` entries -> one stacked
    `{prefix}fcN_weight` entry; per-expert `_extra_state` entries (always None) are dropped."""
    found: Dict[str, Dict[int, torch.Tensor]] = {"linear_fc1": {}, "linear_fc2": {}}
    for full in [k for k in state_dict if k.startswith(prefix)]:
        match = _PER_EXPERT.match(full[len(prefix):])
        if match is None:
            continue
        value = state_dict.pop(full)
        if match[3] == "weight":
            found[match[2]][int(match[1])] = value
    for name, (linear, _) in PROJECTIONS.items():
        experts = found[linear]
        if not experts:
            continue
        if sorted(experts) != list(range(num_local_experts)):
            error(f"{prefix}local_experts.*.{linear}.weight: expected experts 0..{num_local_experts - 1}, "
                  f"got {sorted(experts)}")
            continue
        state_dict[prefix + name] = torch.stack([experts[i] for i in range(num_local_experts)])
