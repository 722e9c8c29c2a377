"""Prepare the embedded default on disk: its byte-level BPE tokenizer and its tokenized indexed dataset.

Both are pure functions of (corpus version, vocabulary size / tokenizer), built once into the cache and
reused. Callers hold the cache lock (see `build.py`); the files themselves are written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, List

from dsv4_train.data import embedded_corpus
from dsv4_train.data.indexed import read_meta, write_indexed_dataset
from dsv4_train.data.tokenizer import (
    EMBEDDED_EOD,
    TextTokenizer,
    embedded_tokenizer_path,
    load_tokenizer,
    train_embedded_tokenizer,
)

_ENCODE_CHUNK = 512  # documents per encode_batch call (the Rust side parallelises within a call)


def embedded_tokenizer(cache_dir: Path, *, vocab_size: int, log=print) -> TextTokenizer:
    """The cached embedded BPE for `vocab_size`, trained on first use (~0.5 s)."""
    path = embedded_tokenizer_path(cache_dir, vocab_size)
    if not path.is_file():
        started = time.perf_counter()
        train_embedded_tokenizer(path, vocab_size=vocab_size)
        log(f"[data] trained the embedded byte-level BPE (vocab {vocab_size}) in {time.perf_counter() - started:.1f}s -> {path}")
    return load_tokenizer(path, vocab_size=vocab_size, eod_token=EMBEDDED_EOD, field_name="embedded tokenizer cache file")


def embedded_prefix(cache_dir: Path, tokenizer: TextTokenizer) -> Path:
    """Where the embedded corpus tokenized by `tokenizer` lives (keyed by corpus version and tokenizer hash)."""
    return cache_dir / f"embedded-v{embedded_corpus.CORPUS_VERSION}" / f"tokenizer-{tokenizer.sha256[:16]}" / "corpus"


def _encoded_documents(tokenizer: TextTokenizer) -> Iterator[List[int]]:
    chunk: List[str] = []
    for document in embedded_corpus.documents():
        chunk.append(document)
        if len(chunk) == _ENCODE_CHUNK:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def embedded_indexed_dataset(cache_dir: Path, tokenizer: TextTokenizer, *, log=print) -> Path:
    """The prefix of the tokenized embedded corpus, written on first use (~1 s). Complete iff its .meta.json exists."""
    prefix = embedded_prefix(cache_dir, tokenizer)
    meta = read_meta(prefix)
    if meta is not None and meta.tokenizer_sha256 == tokenizer.sha256:
        return prefix
    started = time.perf_counter()
    meta = write_indexed_dataset(
        prefix,
        _encoded_documents(tokenizer),
        tokenizer_sha256=tokenizer.sha256,
        tokenizer_vocab_size=tokenizer.vocab_size,
        eod=tokenizer.eod,
        source=f"dsv4_train embedded corpus v{embedded_corpus.CORPUS_VERSION}",
    )
    log(
        f"[data] tokenized the embedded corpus: {meta.documents} documents, {meta.tokens} tokens in "
        f"{time.perf_counter() - started:.1f}s -> {prefix}"
    )
    return prefix
