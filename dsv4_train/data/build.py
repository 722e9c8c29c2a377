"""`build_data`: config -> tokenizer + Megatron GPT datasets + this rank's micro-batch iterator.

Order of work: every user error that can be found cheaply (config values, missing files, unreadable or
too-large tokenizers, dataset/tokenizer mismatches, empty splits) raises ValueError before anything
expensive runs; then the embedded tokenizer/corpus are prepared (rank 0 first, under the cache lock);
then Megatron builds or loads its dataset indices (collective); then a DataLoader over this rank's share
of each global batch is wrapped into the iterator the training loop consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from dsv4_train.data import cache, embedded_corpus
from dsv4_train.data.embedded import embedded_indexed_dataset, embedded_tokenizer
from dsv4_train.data.gpt_datasets import build_gpt_datasets, check_documents_per_split, split_matrix
from dsv4_train.data.indexed import check_prefix, parse_blend
from dsv4_train.data.sampler import PretrainingBatchSampler
from dsv4_train.data.tokenizer import TextTokenizer, check_embedded_vocab_size, load_tokenizer

KINDS = ("embedded", "indexed", "mock")
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class TrainData:
    """What `build_data` returns. `train_iterator` yields this rank's micro-batches, in step order.

    Each item: {"tokens", "labels", "position_ids": LongTensor [micro_batch, seq],
                "loss_mask": FloatTensor [micro_batch, seq]}; labels[:, i] == the token after tokens[:, i].
    With data.document_mask also "segment_ids" [micro_batch, seq] (`segments_from_eod`).
    """

    tokenizer: TextTokenizer
    train_dataset: Any
    valid_dataset: Any
    train_iterator: Iterator[Dict[str, torch.Tensor]]
    micro_batches: int  # how many items train_iterator yields on this rank
    summary: str
    details: Dict[str, Any] = field(default_factory=dict)
    # A fresh iterator over the first train.eval_iters global batches of the validation split (this
    # rank's share), or None without evaluation.
    make_valid_iterator: Optional[Callable[[], Iterator[Dict[str, torch.Tensor]]]] = None

    def describe(self) -> str:
        return self.summary


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _check_batching(*, train_cfg, dp_rank: int, dp_size: int, consumed_samples: int) -> int:
    """Validate batch arithmetic; returns the total number of samples of the run."""
    mbs, gbs, steps = train_cfg.micro_batch_size, train_cfg.global_batch_size, train_cfg.max_steps
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"build_data: dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
    if mbs < 1 or gbs < 1 or steps < 1 or train_cfg.seq_length < 1:
        raise ValueError(
            f"train.micro_batch_size={mbs}, train.global_batch_size={gbs}, train.max_steps={steps} and "
            f"train.seq_length={train_cfg.seq_length} must all be >= 1."
        )
    if gbs % (mbs * dp_size) != 0:
        raise ValueError(
            f"train.global_batch_size={gbs} is not a multiple of train.micro_batch_size={mbs} x "
            f"data-parallel size {dp_size}; choose a global batch size divisible by {mbs * dp_size}."
        )
    end = steps * gbs
    if consumed_samples < 0 or consumed_samples > end or consumed_samples % gbs != 0:
        raise ValueError(
            f"consumed_samples={consumed_samples} must be a multiple of train.global_batch_size={gbs} in "
            f"[0, train.max_steps x global_batch_size = {end}] (a checkpoint taken at a step boundary)."
        )
    return end


def _resolve_tokenizer_early(data_cfg, vocab_size: int) -> Optional[TextTokenizer]:
    """Load a user tokenizer (validated) now; for the embedded one only check the vocabulary size."""
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer, vocab_size=vocab_size, eod_token=data_cfg.eod_token)
    if data_cfg.kind == "indexed":
        raise ValueError(
            "data.kind=indexed needs data.tokenizer: the tokenizer.json the data was preprocessed with "
            "(dsv4-preprocess --tokenizer), so that EOD and vocabulary match the token ids on disk."
        )
    check_embedded_vocab_size(vocab_size)
    return None


def _collective_prepare(cache_dir: Path, fn, log):
    """Run `fn()` on rank 0 (under the cache lock) first, then on the other ranks, which then find its files.

    Without torch.distributed every process takes the lock in turn; `fn` reuses what it finds complete.
    The second barrier keeps rank 0 from taking the lock again (in `build_gpt_datasets`, where it holds it
    across Megatron's barriers) while another rank still waits for it here: that would deadlock.
    """
    if not _is_distributed():
        with cache.exclusive_lock(cache_dir):
            return fn(log)
    result = None
    if _rank() == 0:
        with cache.exclusive_lock(cache_dir):
            result = fn(log)
    torch.distributed.barrier()
    if _rank() != 0:
        with cache.exclusive_lock(cache_dir):
            result = fn(lambda *_a, **_k: None)
    torch.distributed.barrier()
    return result


def segments_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] token ids -> [b, s] document ids: a document ends with (and includes) its EOD token."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


def _iterate(loader, eod: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    for batch in loader:
        item = {key: batch[key] for key in BATCH_KEYS}
        if eod is not None:
            item["segment_ids"] = segments_from_eod(item["tokens"], eod)
        yield item


def _check_data_config(data_cfg) -> None:
    if data_cfg.kind not in KINDS:
        raise ValueError(f"data.kind={data_cfg.kind!r} is not one of {', '.join(KINDS)}.")
    if data_cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={data_cfg.num_workers} must be >= 0 (0 = load in the training process).")
    if data_cfg.kind != "indexed" and list(data_cfg.paths):
        raise ValueError(
            f"data.paths={list(data_cfg.paths)!r} is set but data.kind={data_cfg.kind} ignores it. Set "
            f"data.kind=indexed to train on those datasets, or clear data.paths."
        )
    if data_cfg.kind != "mock":
        split_matrix(data_cfg.split)


def _summary_parts(data_cfg, train_cfg, prefixes, weights, documents, tokenizer, train_samples: int, cache_dir) -> list:
    """The data line of the start-up banner, as parts."""
    source = {
        "embedded": f"embedded corpus v{embedded_corpus.CORPUS_VERSION}",
        "indexed": "indexed " + ", ".join(
            (f"{w:g}x " if weights else "") + p for p, w in zip(prefixes or [], weights or [None] * len(prefixes or []))
        ),
        "mock": "Megatron MockGPTDataset (synthetic)",
    }[data_cfg.kind]
    parts = [source]
    if documents is not None:
        parts.append(f"{sum(d for d, _ in documents)} documents, {sum(t for _, t in documents)} tokens")
    parts.append(f"tokenizer vocab {tokenizer.vocab_size} (eod {tokenizer.eod}, {tokenizer.path.name})")
    split_note = "" if data_cfg.kind == "mock" else f", split {data_cfg.split}"
    parts.append(f"{train_samples} train samples x {train_cfg.seq_length} tokens{split_note}")
    parts.append(f"cache {cache_dir}")
    return parts


def _valid_iterator_factory(data_cfg, train_cfg, valid_ds, *, eod, dp_rank: int, dp_size: int):
    """A function giving a fresh iterator over `train.eval_iters` global batches of the validation
    split (None when evaluation is off); refuses a split too small for them."""
    eval_samples = train_cfg.global_batch_size * getattr(train_cfg, "eval_iters", 0)
    if not eval_samples:
        return None
    if valid_ds is None or len(valid_ds) < eval_samples:
        raise ValueError(
            f"train.eval_iters={train_cfg.eval_iters} needs {eval_samples} validation samples; data.split="
            f"{data_cfg.split!r} gives {0 if valid_ds is None else len(valid_ds)}. Give the validation part a "
            "weight (e.g. data.split=98,2,0) or lower train.eval_iters."
        )

    def make_valid_iterator():
        sampler = PretrainingBatchSampler(
            total_samples=len(valid_ds), consumed_samples=0, end_samples=eval_samples,
            micro_batch_size=train_cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        )
        return _iterate(torch.utils.data.DataLoader(valid_ds, batch_sampler=sampler), eod=eod)

    return make_valid_iterator


def build_data(*, data_cfg, train_cfg, vocab_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
               consumed_samples: int = 0) -> TrainData:
    """Tokenizer, datasets and this data-parallel rank's micro-batch iterator.

    Collective when torch.distributed is initialised: call it on every rank.

    Args:
        data_cfg: `DataConfig` (kind, paths, tokenizer, split, cache_dir, num_workers, eod_token).
        train_cfg: `TrainConfig` (max_steps, global_batch_size, micro_batch_size, seq_length).
        vocab_size: the model's vocabulary size (embedded BPE size; upper bound for token ids).
        seed: dataset shuffling seed (Megatron's `random_seed`).
        dp_rank, dp_size: this rank's data-parallel coordinates.
        consumed_samples: samples consumed by all ranks so far (resume point; multiple of global batch).

    Raises:
        ValueError: any user error, before expensive work.
    """
    log = print if _rank() == 0 else (lambda *_a, **_k: None)
    _check_data_config(data_cfg)
    end_samples = _check_batching(train_cfg=train_cfg, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples)
    cache_dir = cache.resolve_cache_dir(data_cfg.cache_dir)
    tokenizer = _resolve_tokenizer_early(data_cfg, vocab_size)
    prefixes: Optional[List[str]] = None
    weights: Optional[List[float]] = None
    if data_cfg.kind == "indexed":
        prefixes, weights = parse_blend(list(data_cfg.paths))
        for prefix in prefixes:
            check_prefix(prefix, tokenizer_sha256=tokenizer.sha256, tokenizer_path=str(data_cfg.tokenizer), vocab_size=vocab_size)

    # Expensive preparation (embedded tokenizer training, corpus tokenization), rank 0 first.
    if tokenizer is None:
        tokenizer = _collective_prepare(cache_dir, lambda lg: embedded_tokenizer(cache_dir, vocab_size=vocab_size, log=lg), log)
    if data_cfg.kind == "embedded":
        prefixes = [str(_collective_prepare(cache_dir, lambda lg: embedded_indexed_dataset(cache_dir, tokenizer, log=lg), log))]
    documents = None
    if prefixes is not None:
        documents = check_documents_per_split(prefixes, data_cfg.split)

    train_ds, valid_ds = build_gpt_datasets(
        kind="mock" if data_cfg.kind == "mock" else "indexed",
        prefixes=prefixes,
        weights=weights,
        split=data_cfg.split,
        tokenizer=tokenizer,
        seed=seed,
        sequence_length=train_cfg.seq_length,
        train_samples=end_samples,
        eval_samples=train_cfg.global_batch_size * max(1, getattr(train_cfg, "eval_iters", 0)),
        cache_dir=cache_dir,
    )
    assert len(train_ds) >= end_samples, (len(train_ds), end_samples)

    sampler = PretrainingBatchSampler(
        total_samples=len(train_ds),
        consumed_samples=consumed_samples,
        end_samples=end_samples,
        micro_batch_size=train_cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=data_cfg.num_workers,
        persistent_workers=data_cfg.num_workers > 0,
    )
    parts = _summary_parts(data_cfg, train_cfg, prefixes, weights, documents, tokenizer, len(train_ds), cache_dir)
    tokens = None if documents is None else sum(t for _, t in documents)
    eod = tokenizer.eod if getattr(data_cfg, "document_mask", False) else None
    make_valid_iterator = _valid_iterator_factory(data_cfg, train_cfg, valid_ds, eod=eod, dp_rank=dp_rank, dp_size=dp_size)
    return TrainData(
        make_valid_iterator=make_valid_iterator,
        tokenizer=tokenizer,
        train_dataset=train_ds,
        valid_dataset=valid_ds,
        train_iterator=_iterate(loader, eod=eod),
        micro_batches=len(sampler),
        summary="; ".join(parts),
        details={"prefixes": prefixes, "weights": weights, "documents": documents, "tokens": tokens,
                 "cache_dir": str(cache_dir)},
    )

