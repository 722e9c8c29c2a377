"""Checkpoint bridges to and from other formats (Hugging Face / DeepSeek native)."""

from dsv4_train.bridge.hf import load_hf, model_config_from_hf

__all__ = ["load_hf", "model_config_from_hf"]
