"""Read a dsv4-train checkpoint one model tensor at a time, whatever layout saved it.

Each request is a torch.distributed.checkpoint load of one tensor's region (an expert is one slice of
its stacked key), so only the chunks overlapping it are read; the `.metadata` is parsed once. The
model is the meta-device build of the checkpoint's own model config (`dsv4_complete.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import fields
from typing import Dict, List

import torch

from dsv4_train.config.model import ModelConfig, YarnConfig


def model_config_of(path: str) -> ModelConfig:
    from dsv4_train.checkpoint.io import COMPLETE_MARKER

    marker_path = os.path.join(path, COMPLETE_MARKER)
    try:
        with open(marker_path) as handle:
            saved = json.load(handle).get("model")
    except (OSError, ValueError) as error:
        raise ValueError(f"{marker_path}: unreadable ({error}); {path} is not a complete dsv4-train checkpoint.") from None
    if not saved:
        raise ValueError(f"{marker_path} records no model config (a checkpoint from before configs were saved).")
    known = {f.name for f in fields(ModelConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    values["yarn"] = YarnConfig(**values.get("yarn", {}))
    return ModelConfig(**values)


def _cached_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    class CachedMetadataReader(FileSystemReader):
        """Parses `.metadata` once for all the per-tensor loads."""

        _metadata = None

        def read_metadata(self):
            if self._metadata is None:
                self._metadata = super().read_metadata()
            return self._metadata

    return CachedMetadataReader(path)


class CheckpointTensors:
    """`read(name)` -> our model tensor `name` as stored (e.g. bf16), assembled from the checkpoint."""

    def __init__(self, path: str):
        from dsv4_train.checkpoint.io import initialised_on_load
        from dsv4_train.checkpoint.safe_load import check_metadata
        from dsv4_train.convert.importer import build_meta_model, model_tensors

        check_metadata(path)  # nothing in it may run code
        self.path = path
        self.model_cfg = model_config_of(path)
        self.model = build_meta_model(self.model_cfg, dtype="fp32")
        self.absent = initialised_on_load(path)
        self.shapes = {name: tuple(t.shape) for name, t in model_tensors(self.model).items()
                       if not name.startswith(self.absent)}
        self.entries = self.model.sharded_state_dict()
        self.reader = _cached_reader(path)
        metadata = self.reader.read_metadata().state_dict_metadata
        self.stored_dtype: Dict[str, torch.dtype] = {}
        for name in self.shapes:
            key = self._leaves(name)[0].key
            if key not in metadata:
                raise ValueError(f"checkpoint {path} has no tensor {key} (for {name}); it does not match its own "
                                 "model config.")
            self.stored_dtype[name] = metadata[key].properties.dtype

    def names(self) -> List[str]:
        return list(self.shapes)

    def _leaves(self, name: str) -> list:
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        from dsv4_train.checkpoint.io import _sharded_leaves

        entry = self.entries[name]
        built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
        return sorted(_sharded_leaves(built), key=lambda leaf: tuple(leaf.global_offset))

    def read(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict

        from dsv4_train.checkpoint.safe_load import tensors_only_loads

        leaves = self._leaves(name)
        parts = []
        for leaf in leaves:
            part = torch.empty(leaf.local_shape, dtype=self.stored_dtype[name])
            parts.append(part)
            # The stacking axes (an expert's index) as ordinary axes of extent 1: one region of the
            # global tensor, read without the other experts.
            prepend = (1,) * leaf.prepend_axis_num
            region = dataclasses.replace(leaf, data=part.view(prepend + tuple(leaf.local_shape)),
                                         dtype=part.dtype, local_shape=prepend + tuple(leaf.local_shape),
                                         prepend_axis_num=0)
            request = mcore_to_pyt_state_dict({leaf.key: [region]}, is_loading=True)
            with tensors_only_loads():
                dcp.load(request, storage_reader=self.reader, no_dist=True)
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return value.reshape(self.shapes[name])
