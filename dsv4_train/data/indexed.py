"""Tokenized documents <-> Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`).

Writing goes through Megatron-Core's `IndexedDatasetBuilder` (one sequence per document, each ending
with the EOD id), into temporary files that are renamed into place only when complete. Next to them we
write `<prefix>.meta.json` (our addition, not a Megatron format): the tokenizer's hash and size, the
EOD id, document/token counts and the largest token id. Training reads it (when present) to refuse data
tokenized with a different tokenizer or with ids beyond the model vocabulary, without scanning `.bin`;
without it, the largest id is found by a chunked scan of `.bin` (`scan_max_token_id`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy

from dsv4_train.data.cache import temporary_sibling, write_text_atomic
from dsv4_train.data.megatron_imports import megatron_datasets

META_SUFFIX = ".meta.json"
META_FORMAT = "dsv4-indexed-v1"


@dataclass
class IndexedMeta:
    """Contents of `<prefix>.meta.json`."""

    format: str
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    eod: int
    documents: int
    tokens: int
    max_token_id: int
    skipped_empty_documents: int
    source: str


def bin_path(prefix: Path) -> Path:
    return Path(str(prefix) + ".bin")


def idx_path(prefix: Path) -> Path:
    return Path(str(prefix) + ".idx")


def meta_path(prefix: Path) -> Path:
    return Path(str(prefix) + META_SUFFIX)


def write_indexed_dataset(
    prefix: Path,
    token_documents: Iterable[Sequence[int]],
    *,
    tokenizer_sha256: str,
    tokenizer_vocab_size: int,
    eod: int,
    source: str,
    on_document: Optional[Callable[[int, int], None]] = None,
) -> IndexedMeta:
    """Write documents (lists of token ids, without EOD) as `<prefix>.bin/.idx/.meta.json`, atomically.

    Empty documents are skipped (they would be a lone EOD) and counted. `on_document(documents, tokens)`
    is called after each document (progress reporting).

    Ordering of the final renames: the old `.meta.json` and `.idx` are removed first, then `.bin` and
    `.idx` are moved into place, then `.meta.json`; an interruption leaves a prefix that reads as missing
    or incomplete, never an old index paired with new data.
    """
    mc = megatron_datasets()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = mc.DType.optimal_dtype(tokenizer_vocab_size)
    tmp_prefix = temporary_sibling(prefix)
    tmp_bin, tmp_idx = bin_path(tmp_prefix), idx_path(tmp_prefix)
    documents = tokens = skipped = 0
    max_token_id = -1
    try:
        builder = mc.IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        for ids in token_documents:
            if len(ids) == 0:
                skipped += 1
                continue
            document = numpy.empty(len(ids) + 1, dtype=numpy.int64)
            document[:-1] = ids
            document[-1] = eod
            builder.add_document(document, [document.size])
            documents += 1
            tokens += document.size
            max_token_id = max(max_token_id, int(document.max()))
            if on_document is not None:
                on_document(documents, tokens)
        builder.finalize(str(tmp_idx))
        meta = IndexedMeta(
            format=META_FORMAT,
            tokenizer_sha256=tokenizer_sha256,
            tokenizer_vocab_size=tokenizer_vocab_size,
            eod=eod,
            documents=documents,
            tokens=tokens,
            max_token_id=max_token_id,
            skipped_empty_documents=skipped,
            source=source,
        )
        for stale in (meta_path(prefix), idx_path(prefix)):
            if stale.exists():
                stale.unlink()
        os.replace(tmp_bin, bin_path(prefix))
        os.replace(tmp_idx, idx_path(prefix))
        write_text_atomic(meta_path(prefix), json.dumps(asdict(meta), indent=2) + "\n")
        return meta
    finally:
        for leftover in (tmp_bin, tmp_idx):
            if leftover.exists():
                leftover.unlink()


def read_meta(prefix: Path) -> Optional[IndexedMeta]:
    """The `.meta.json` next to an indexed dataset, or None when there is none (e.g. Megatron-LM output)."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return IndexedMeta(**raw)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path} is not a valid dsv4-preprocess metadata file ({error}). Re-run dsv4-preprocess for "
            f"{prefix}, or delete {path.name} to skip the tokenizer/vocabulary checks it enables."
        ) from None


def parse_blend(entries: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """`data.paths` -> (prefixes, weights or None), Megatron-LM `--data-path` style.

    Entries are whitespace-split and flattened: either all prefixes (`["a", "b"]`), or alternating
    weight/prefix pairs (`["0.3 a", "0.7 b"]` or `["0.3 a 0.7 b"]`). Prefixes are made absolute.

    Raises:
        ValueError: empty list, mixed weighted/unweighted entries, or non-positive weights.
    """
    tokens = [token for entry in entries for token in str(entry).split()]
    if not tokens:
        raise ValueError(
            "data.paths is empty but data.kind=indexed needs at least one dataset prefix (the path "
            "without .bin/.idx, as written by dsv4-preprocess --output-prefix). Set data.paths, or use "
            "data.kind=embedded / mock."
        )

    def as_weight(token: str) -> Optional[float]:
        try:
            return float(token)
        except ValueError:
            return None

    if as_weight(tokens[0]) is None:
        if any(as_weight(t) is not None for t in tokens):
            raise ValueError(
                f"data.paths={entries!r} mixes weighted and unweighted entries. Either give only "
                f"prefixes, or a weight before every prefix (e.g. ['0.7 /data/a', '0.3 /data/b'])."
            )
        return [str(Path(t).expanduser().resolve()) for t in tokens], None
    if len(tokens) % 2 != 0 or any(as_weight(w) is None for w in tokens[0::2]):
        raise ValueError(
            f"data.paths={entries!r} mixes weighted and unweighted entries. Either give only prefixes, "
            f"or a weight before every prefix (e.g. ['0.7 /data/a', '0.3 /data/b'])."
        )
    weights = [float(w) for w in tokens[0::2]]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"data.paths={entries!r}: blend weights must be finite and > 0; drop a dataset instead of "
                         "weighting it 0.")
    return [str(Path(p).expanduser().resolve()) for p in tokens[1::2]], weights


def _read_index(prefix: str):
    """The parsed `<prefix>.idx` (Megatron's reader of the index alone, no .bin mmap)."""
    from dsv4_train.data.megatron_imports import megatron_datasets

    megatron_datasets()  # the CPU-safe import of megatron.core.datasets
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        return _IndexReader(prefix + ".idx", multimodal=False)
    except Exception as error:  # Megatron raises assorted errors on a garbled index
        raise ValueError(
            f"data.paths entry {prefix!r}: {prefix}.idx cannot be read ({type(error).__name__}: {error}); re-create "
            "the dataset with dsv4-preprocess."
        ) from None


def check_bin_matches_index(prefix: str) -> None:
    """The .idx parses and the .bin has exactly the bytes it describes (a truncated copy or a .bin of
    another dataset is refused here, not deep inside the dataset index build)."""
    index = _read_index(prefix)
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if len(index) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ValueError(
            f"data.paths entry {prefix!r}: {prefix}.bin has {actual} bytes but {prefix}.idx describes {expected} "
            "(truncated, or the .bin of another dataset); re-create the dataset with dsv4-preprocess."
        )


SCAN_CHUNK_TOKENS = 1 << 24  # 32-64 MiB of uint16/int32 ids per numpy max
_scanned: dict = {}  # (path, size, mtime_ns) -> largest id: pre-flight and build_data scan once per process


def scan_max_token_id(prefix: str, *, chunk_tokens: int = SCAN_CHUNK_TOKENS) -> int:
    """The largest token id in `<prefix>.bin` (-1 when empty), read through a memory map in chunks (the
    dtype from the .idx), for data without a `.meta.json` (e.g. written by Megatron-LM's tools)."""
    stat = os.stat(prefix + ".bin")
    key = (os.path.realpath(prefix + ".bin"), stat.st_size, stat.st_mtime_ns, chunk_tokens)
    if key not in _scanned:
        dtype = _read_index(prefix).dtype
        largest = -1
        if stat.st_size:
            tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
            for start in range(0, tokens.size, chunk_tokens):
                largest = max(largest, int(tokens[start:start + chunk_tokens].max()))
        _scanned[key] = largest
    return _scanned[key]


def _check_ids_in_vocab(prefix: str, largest: int, vocab_size: int, *, where: str) -> None:
    if largest >= vocab_size:
        raise ValueError(
            f"data.paths entry {prefix!r}: {where} holds token id {largest} but model.vocab_size is {vocab_size}. "
            f"Raise model.vocab_size to > {largest}, or re-tokenize the data with the model's tokenizer "
            "(dsv4-preprocess)."
        )


def check_prefix(prefix: str, *, tokenizer_sha256: str, tokenizer_path: str, vocab_size: int) -> Optional[IndexedMeta]:
    """Cheap checks of one `data.paths` prefix before any dataset index is built.

    Raises:
        ValueError: missing `.bin`/`.idx`, or a `.meta.json` showing another tokenizer or ids >= vocab_size.
    """
    path = Path(prefix)
    missing = [p.name for p in (bin_path(path), idx_path(path)) if not p.is_file()]
    if missing:
        hint = " (give the prefix without the .bin/.idx extension)" if path.suffix in (".bin", ".idx") else ""
        raise ValueError(
            f"data.paths entry {prefix!r}: {', '.join(missing)} not found{hint}. Create the dataset with "
            f"`dsv4-preprocess --input data.jsonl --output-prefix {prefix} --tokenizer tokenizer.json`, "
            f"or fix the path."
        )
    check_bin_matches_index(prefix)
    meta = read_meta(path)
    if meta is None:  # no recorded max id: scan the .bin once (as fast as the disk reads it)
        _check_ids_in_vocab(prefix, scan_max_token_id(prefix), vocab_size, where=f"{prefix}.bin")
        return None
    if meta.tokenizer_sha256 != tokenizer_sha256:
        raise ValueError(
            f"data.paths entry {prefix!r} was tokenized with a different tokenizer (sha256 "
            f"{meta.tokenizer_sha256[:12]}...) than data.tokenizer={tokenizer_path!r} "
            f"({tokenizer_sha256[:12]}...). Re-run dsv4-preprocess with the training tokenizer, set "
            f"data.tokenizer to the one used for preprocessing, or delete {meta_path(path).name} to skip this check."
        )
    _check_ids_in_vocab(prefix, meta.max_token_id, vocab_size, where=f"{prefix}.bin (per {meta_path(path).name})")
    return meta
