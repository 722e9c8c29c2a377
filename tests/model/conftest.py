"""Fixtures for single-process tests of V4 model modules (attention, RoPE, compressor, indexer).

`mcore` = the suite's world-size-1 gloo group + Megatron parallel state (TP=PP=1) with the CPU
compatibility layer applied and Megatron's RNG tracker seeded (`tests/conftest.py::megatron_world1`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dsv4_train.config.model import ModelConfig
from dsv4_train.mcore import cpu_compat

# Test modules here import megatron.core (and dsv4_train.model.*) at module level: patch first.
cpu_compat.apply()

TINY_YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"


def tiny_model_config(**overrides) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(TINY_YAML))
    cfg = OmegaConf.to_object(merged)
    return dataclasses.replace(cfg, **overrides)


def transformer_config_for(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        params_dtype=dtype,
        use_cpu_initialization=True,
        init_method_std=model_cfg.init_std,
        add_bias_linear=False,
        tensor_model_parallel_size=1,
    )


@pytest.fixture(scope="session")
def mcore(megatron_world1):
    return megatron_world1


@pytest.fixture
def build_attention(mcore):
    """build_attention(model_cfg, layer_index, seed=0) -> HybridAttention in fp32 on CPU."""
    from dsv4_train.model.attention import HybridAttention

    def build(model_cfg: ModelConfig, layer_index: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        torch.manual_seed(seed)
        return HybridAttention(
            config=transformer_config_for(model_cfg, dtype), model_cfg=model_cfg, layer_index=layer_index
        )

    return build
