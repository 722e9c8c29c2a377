"""Fixes for two Megatron-Core 0.19.2 optimizer checkpoint bugs (all devices, not CPU-specific);
applied by dsv4_train/mcore/__init__.py::apply at start-up.

1. DistributedOptimizer resume:
`_set_main_param_and_optimizer_states` (used when loading the `fully_reshardable` format) copies
every tensor of the inner optimizer's per-param state from the checkpoint, including torch AdamW's
`step`, which that format does not store: `KeyError: 'step'`. The step
count is restored separately from the param groups, so a state key missing from the checkpoint is
skipped here. Only the non-precision-aware branch is replaced; the other branch is untouched.

2. Float16OptimizerWithFloat16Params (bf16 without the distributed optimizer, e.g. Muon) numbers
the optimizer state by its bf16 parameters only, while torch numbers every parameter of every
group: with the fp32 groups of model/precision.py the ids shift and saving fails (`KeyError`).
Here every parameter of the inner optimizer, in its order, is mapped to its model parameter.
Loading it then pairs saved and current param groups by their identifier keys; our fp32 groups
share them with the bf16 groups (only the parameters' dtype differs), and duplicates collapse
into one group ("doesn't match the size of optimizer's group"). Groups whose identifiers agree
position by position are paired by position instead.
"""

from __future__ import annotations

import torch

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param}
        for key, value in self.optimizer.state[main_param].items():
            if torch.is_tensor(value):
                destinations[key] = value
        for key, destination in destinations.items():
            source = tensors.get(key)
            if torch.is_tensor(source):  # AdamW's `step` is not part of the checkpointed tensors
                destination.copy_(source)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _fix_float16_optimizer_state_ids()
    _fix_duplicate_group_identifiers()
    _applied = True


def _fix_duplicate_group_identifiers() -> None:
    from megatron.core.optimizer.optimizer import MegatronOptimizer, param_group_identifier_keys

    original = MegatronOptimizer._filter_and_reorder_param_groups

    def identifier(group: dict) -> tuple:
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)

    def filter_and_reorder(current_groups, state_dict_groups):
        if [identifier(g) for g in current_groups] == [identifier(g) for g in state_dict_groups]:
            return [dict(group) for group in state_dict_groups]
        return original(current_groups, state_dict_groups)

    MegatronOptimizer._filter_and_reorder_param_groups = staticmethod(filter_and_reorder)


def _fix_float16_optimizer_state_ids() -> None:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        model_of = {main: model for mains, models in zip(self.fp32_from_float16_groups, self.float16_groups)
                    for main, model in zip(mains, models)}
        in_order = [model_of.get(p, p) for group in self.optimizer.param_groups for p in group["params"]]
        sharded_of = get_param_id_to_sharded_param_map(model_sharded_state_dict, in_order)
        index_of = {id(p): i for i, p in enumerate(in_order)}
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(sharded_of[index_of[id(model)]], main, prefix="optimizer.state.fp32_param")
             for model, main in zip(models, mains)]
            for models, mains in zip(self.float16_groups, state_dict["fp32_from_fp16_params"])
        ]
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], sharded_of, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict

    Float16OptimizerWithFloat16Params.sharded_state_dict = sharded_state_dict


def applied() -> bool:
    return _applied
