"""A `ModuleList` that keeps Megatron-Core's tensor/expert-parallel checkpoint sharding.

Why: Megatron's default `sharded_state_dict` recursion (`sharded_state_dict_default`) treats a child
that has no `sharded_state_dict` method, such as a plain `torch.nn.ModuleList`, as fully replicated:
every parameter underneath (TP-split linears, EP-local experts) is then saved and loaded as if each
rank held the whole tensor. Under TP that fails at load ("Global shape mismatch"); under EP it is
silent and wrong (each EP rank loads experts 0..n_local-1 instead of its own). This list asks each
child for its own sharded state dict instead.

`key_offset` names the children in checkpoints by a global index (`<prefix><key_offset + i>.`) while
the in-memory state-dict keys stay local (`<prefix><i>.`), as Megatron's `TransformerBlock` does for
pipeline stages: a stage holding layers 4..7 saves them as `layers.4` .. `layers.7`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.utils import sharded_state_dict_default


class ShardedModuleList(torch.nn.ModuleList):
    def __init__(self, modules: Iterable[torch.nn.Module] = (), *, key_offset: int = 0):
        super().__init__(modules)
        self.key_offset = key_offset

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = {}
        for index, module in enumerate(self):
            local_prefix = f"{prefix}{index}."
            child = sharded_state_dict_default(module, local_prefix, sharded_offsets, metadata)
            if self.key_offset:
                replace_prefix_for_sharding(child, local_prefix, f"{prefix}{self.key_offset + index}.")
            state.update(child)
        return state
