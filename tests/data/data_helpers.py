"""Small helpers shared by the data tests."""

from __future__ import annotations

from dsv4_train.config.schema import DataConfig, TrainConfig

VOCAB = 512  # the tiny model's vocabulary


def train_config(**overrides) -> TrainConfig:
    values = dict(max_steps=6, global_batch_size=8, micro_batch_size=2, seq_length=64)
    values.update(overrides)
    return TrainConfig(**values)


def data_config(cache_dir, **overrides) -> DataConfig:
    return DataConfig(cache_dir=str(cache_dir), **overrides)
