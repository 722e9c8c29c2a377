"""Build the full tiny V4 model for tests (world-1 Megatron runtime required)."""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf

from dsv4_train.config.model import ModelConfig


def tiny_cfg(**overrides) -> ModelConfig:
    from pathlib import Path

    yaml = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml)))
    return dataclasses.replace(cfg, **overrides)


def build_tiny(seed: int = 0, **overrides):
    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    cfg = tiny_cfg(**overrides)
    torch.manual_seed(seed)
    return build_model(model_cfg=cfg, transformer_config=build_transformer_config(model_cfg=cfg))


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
