"""Data pipeline: tokenizers, Megatron indexed datasets, GPT datasets and per-rank micro-batch iterators.

Entry point for the training loop: `build_data(...)` (see `build.py`). Users' own data goes through
`python -m dsv4_train.data.preprocess` / `dsv4-preprocess` (see `preprocess.py`).
"""

from dsv4_train.data.build import TrainData, build_data
from dsv4_train.data.tokenizer import TextTokenizer

__all__ = ["TrainData", "TextTokenizer", "build_data"]
