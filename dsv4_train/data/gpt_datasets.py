"""Megatron-Core GPT datasets (`GPTDataset` / `BlendedDataset` / `MockGPTDataset`) from our config.

Everything here is Megatron-Core's: `GPTDatasetConfig` + `BlendedMegatronDatasetBuilder` build the
document/sample/shuffle indices (with Megatron's compiled helpers) and cache them as .npy files under
`path_to_cache`. What we add:
- a cache directory per dataset configuration, marked `.complete` only after Megatron has written all
  its files, and deleted if found unmarked (Megatron writes its .npy files in place, so a crash could
  otherwise leave a truncated index that a later run would trust);
- a check that every non-empty split gets at least one document (a split with zero documents makes
  Megatron's epoch computation loop forever).

Distributed behaviour is Megatron's: with torch.distributed initialised, global rank 0 builds the indices
first, the others wait at a barrier and then load them, so `cache_dir` must be on a filesystem all ranks
see. Every rank must call `build_gpt_datasets` (the builder is collective).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from dsv4_train.data import cache
from dsv4_train.data.megatron_imports import megatron_datasets
from dsv4_train.data.tokenizer import TextTokenizer

_SPLIT_PATTERN = re.compile(r"^\s*[0-9.]+(\s*,\s*[0-9.]+){0,2}\s*$")
_SPLIT_NAMES = ("train", "valid", "test")


def split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """Megatron's [(begin, end) or None] per split for a 'train,valid,test' weight string.

    Raises:
        ValueError: malformed string or a zero train weight.
    """
    if not isinstance(split, str) or not _SPLIT_PATTERN.match(split):
        raise ValueError(
            f"data.split={split!r} is not a list of up to three non-negative weights for train,valid,test "
            f"documents. Write it like '98,2,0' (or '1' for train only)."
        )
    weights = [float(w) for w in split.split(",")]
    if weights[0] <= 0:
        raise ValueError(f"data.split={split!r} gives the train split no documents; give it a positive weight (e.g. '98,2,0').")
    megatron_datasets()  # makes `megatron.core` importable first
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def check_documents_per_split(prefixes: List[str], split: str) -> List[Tuple[int, int]]:
    """(documents, tokens) of each prefix; raises if a non-empty split would get no document.

    Mirrors Megatron's `_build_megatron_dataset_splits` book-ends: round(begin * n) .. round(end * n).
    Reads only the .idx files.
    """
    mc = megatron_datasets()
    matrix = split_matrix(split)
    counts = []
    for prefix in prefixes:
        # Keep the IndexedDataset alive while reading: its __del__ unmaps the buffer `lengths` views.
        dataset = mc.IndexedDataset(prefix, multimodal=False, mmap=True)
        lengths = dataset.sequence_lengths
        n = int(lengths.shape[0])
        counts.append((n, int(lengths.sum(dtype="int64"))))
        del lengths, dataset
        for name, bounds in zip(_SPLIT_NAMES, matrix):
            if bounds is not None and int(round(bounds[1] * n)) - int(round(bounds[0] * n)) == 0:
                raise ValueError(
                    f"data.split={split!r} gives the {name} split of {prefix!r} no documents (it has {n}). "
                    f"Give that split weight 0 (e.g. data.split='100,0,0') or use more documents."
                )
    return counts


def _file_identity(prefix: str) -> List[int]:
    """Size and mtime of the .bin/.idx pair: a dataset re-written at the same prefix gets fresh indices
    (Megatron's own cache key has only the path, so it would reuse indices of the old contents)."""
    identity = []
    for suffix in (".bin", ".idx"):
        stat = Path(prefix + suffix).stat()
        identity += [stat.st_size, stat.st_mtime_ns]
    return identity


def _cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def build_gpt_datasets(
    *,
    kind: str,
    prefixes: Optional[List[str]],
    weights: Optional[List[float]],
    split: str,
    tokenizer: TextTokenizer,
    seed: int,
    sequence_length: int,
    train_samples: int,
    eval_samples: int,
    cache_dir: Path,
) -> Tuple[Any, Any]:
    """(train dataset, valid dataset or None), as built by Megatron-Core's BlendedMegatronDatasetBuilder.

    Args:
        kind: "indexed" (real .bin/.idx prefixes) or "mock" (Megatron's MockGPTDataset).
        train_samples: samples the train split must provide (max_steps * global_batch_size).
        eval_samples: samples requested for valid/test (needed by weighted blends; small).
    """
    mc = megatron_datasets()
    mock = kind == "mock"
    sizes = [train_samples, eval_samples, eval_samples]
    index_dir: Optional[Path] = None
    if not mock:
        index_dir = cache_dir / "indices" / _cache_key(
            {"prefixes": prefixes, "files": [_file_identity(p) for p in prefixes], "weights": weights, "split": split,
             "seed": seed, "seq": sequence_length, "sizes": sizes, "tokenizer": tokenizer.sha256, "eod": tokenizer.eod}
        )
    config = mc.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=sequence_length,
        blend=None if mock else (prefixes, weights),
        split=None if mock else split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its own causal/sliding masks
        path_to_cache=None if index_dir is None else str(index_dir),
        num_dataset_builder_threads=1,
    )
    builder = mc.BlendedMegatronDatasetBuilder(
        mc.MockGPTDataset if mock else mc.GPTDataset,
        sizes,
        lambda: True,  # every rank reads its own micro-batches, so every rank needs the datasets
        config,
    )
    is_builder_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if index_dir is None:
        # Mock indices are rebuilt in memory each time (~1 s); silence Megatron's "unable to save" warning.
        gpt_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
        level = gpt_logger.level
        gpt_logger.setLevel(logging.ERROR)
        try:
            train, valid, _test = builder.build()
        finally:
            gpt_logger.setLevel(level)
        return train, valid
    if not is_builder_rank:
        train, valid, _test = builder.build()
        return train, valid
    # Rank 0 (or a lone process) holds the cache lock while Megatron writes, so that independent runs
    # sharing the cache build each index once; other ranks only read after Megatron's barrier.
    with cache.exclusive_lock(cache_dir):
        cache.discard_if_incomplete(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        train, valid, _test = builder.build()
        if not cache.is_complete(index_dir):
            cache.mark_complete(index_dir)
    return train, valid
