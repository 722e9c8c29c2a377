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


def run_experts(module, hidden: torch.Tensor, counts, probs: torch.Tensor):
    """Forward + backward of a routed-expert module (SequentialMLP signature) with a fixed upstream
    gradient -> (output, input gradient, prob gradient); weight gradients stay on the module."""
    hidden = hidden.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, bias = module(hidden, torch.tensor(counts), probs)
    assert bias is None
    out.backward(torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), hidden.grad, probs.grad


def assert_close_to_max(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """|a - b| <= rtol x max|a| (a tolerance relative to the tensor's largest entry)."""
    scale = max(a.abs().max().item(), 1e-30)
    assert (a.float() - b.float()).abs().max().item() <= rtol * scale
