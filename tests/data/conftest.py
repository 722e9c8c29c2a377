"""Shared fixtures for the data tests: one prepared cache (embedded tokenizer + corpus) per session."""

from __future__ import annotations

import pytest
from data_helpers import VOCAB, data_config, train_config

from dsv4_train.data import build_data


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A cache directory where the embedded default has been prepared once (tokenizer, corpus, indices)."""
    cache_dir = tmp_path_factory.mktemp("data_cache")
    build_data(data_cfg=data_config(cache_dir), train_cfg=train_config(), vocab_size=VOCAB, seed=1)
    return cache_dir


@pytest.fixture(scope="session")
def embedded_tokenizer_file(data_cache):
    from dsv4_train.data.tokenizer import embedded_tokenizer_path

    return embedded_tokenizer_path(data_cache, VOCAB)
