"""A DeepSeek-V4 checkpoint directory (release or transformers naming) read one tensor at a time.

Everything that can be checked from the headers is checked when the source is opened (names,
quantised weights and their scales, shapes against the model), so a conversion refuses a bad
source before it writes anything. Tensors are then read and dequantised on demand.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from dsv4_train.bridge.hf import model_config_from_hf, native_name, native_sources, release_block_size
from dsv4_train.bridge.release_format import dequantize_one, is_quantized_dtype, logical_shape, scale_pairs, scaled_kind
from dsv4_train.convert.safetensors_io import TensorInfo, load_tensor, read_directory


class SourceCheckpoint:
    """Native-named, dequantised view of a checkpoint directory; nothing is read until asked."""

    def __init__(self, directory: str):
        self.directory = directory
        config_path = os.path.join(directory, "config.json")
        try:
            with open(config_path) as handle:
                self.raw_config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"{config_path}: unreadable ({error}).") from None
        self.block = release_block_size(self.raw_config)
        self.model_cfg = model_config_from_hf(self.raw_config)
        stored = read_directory(directory)
        by_native: Dict[str, TensorInfo] = {}
        self.stored_name: Dict[str, str] = {}
        for name, info in stored.items():
            native = native_name(name)
            if native in by_native:
                raise ValueError(f"checkpoint holds tensor {native!r} twice (under two naming schemes).")
            by_native[native] = info
            self.stored_name[native] = name
        self.scales: Dict[str, TensorInfo] = {}
        self.kinds: Dict[str, str] = {}
        for scale_name, weight_name in scale_pairs(list(by_native)).items():
            if weight_name not in by_native:
                raise ValueError(f"tensor {scale_name}: a block scale without its weight {weight_name}.")
            weight, scale = by_native[weight_name], by_native.pop(scale_name)
            self.kinds[weight_name] = scaled_kind(weight_name, weight.dtype, weight.shape, scale.dtype, scale.shape,
                                                  block=self.block)
            self.scales[weight_name] = scale
        unscaled = sorted(n for n, info in by_native.items() if n not in self.kinds and is_quantized_dtype(n, info.dtype))
        if unscaled:
            raise ValueError(f"tensor {unscaled[0]} is quantised ({by_native[unscaled[0]].dtype}) but has no .scale "
                             "tensor; the checkpoint is incomplete.")
        self.tensors = by_native

    # --- metadata ---------------------------------------------------------------------------
    def shape(self, native: str) -> Tuple[int, ...]:
        info = self.tensors[native]
        return logical_shape(self.kinds[native], info.shape) if native in self.kinds else info.shape

    def stored_dtype(self, native: str) -> torch.dtype:
        return self.tensors[native].dtype

    def nbytes(self, native: str) -> int:
        info = self.tensors[native]
        return info.nbytes + (self.scales[native].nbytes if native in self.scales else 0)

    def sources_of(self, our_name: str) -> Optional[List[str]]:
        return native_sources(our_name)

    def assembled_shape(self, sources: List[str]) -> Tuple[int, ...]:
        shapes = [self.shape(s) for s in sources]
        if len(shapes) == 1:
            return tuple(shapes[0])
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    # --- data -------------------------------------------------------------------------------
    def load(self, native: str) -> torch.Tensor:
        """One tensor as stored, dequantised to float32 when it is FP8/FP4."""
        weight = load_tensor(self.tensors[native])
        if native in self.kinds:
            return dequantize_one(weight, load_tensor(self.scales[native]), block=self.block, name=native)
        return weight

    def load_stored(self, native: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight as stored, its scale or None): for byte-exact comparisons."""
        scale = load_tensor(self.scales[native]) if native in self.scales else None
        return load_tensor(self.tensors[native]), scale

    def assemble(self, sources: List[str]) -> torch.Tensor:
        """Our tensor made of `sources` (concatenated along dim 0, e.g. w1 and w3 into linear_fc1)."""
        parts = [self.load(s) for s in sources]
        if len(parts) == 1:
            return parts[0]
        dtype = parts[0].dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        return torch.cat([p.to(dtype) for p in parts], dim=0)
