"""Fix for a Megatron-Core 0.19.2 DistributedOptimizer resume bug (all devices, not CPU-specific).

`_set_main_param_and_optimizer_states` (used when loading the `fully_reshardable` format) copies
every tensor of the inner optimizer's per-param state from the checkpoint, including torch AdamW's
`step`, which that format does not store: `KeyError: 'step'` (megatron_core_cpu.md #31b). The step
count is restored separately from the param groups, so a state key missing from the checkpoint is
skipped here. Only the non-precision-aware branch is replaced; the other branch is untouched.
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
    _applied = True
