"""`dsv4-preprocess`: JSONL documents -> tokenizer -> Megatron indexed dataset (`.bin/.idx` + `.meta.json`).

    python -m dsv4_train.data.preprocess --input data.jsonl --output-prefix out/mydata \\
        --tokenizer tokenizer.json [--json-key text] [--workers N] [--eod-token TOKEN]

Each non-blank input line is one JSON object; its `--json-key` string is one document. Documents are
tokenized without special tokens and each is followed by the tokenizer's end-of-document token (the
`--append-eod` behaviour of Megatron-LM's tools/preprocess_data.py). The output is `<prefix>.bin`,
`<prefix>.idx` (Megatron-Core's format, written by its IndexedDatasetBuilder) and `<prefix>.meta.json`;
train on it with `data.kind=indexed data.paths=[<prefix>] data.tokenizer=<tokenizer.json>`.

Output order is the input order whatever `--workers` is (workers tokenize chunks; the main process
writes them in sequence). Nothing is left at the output prefix unless the whole input was processed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from dsv4_train.data.indexed import write_indexed_dataset
from dsv4_train.data.megatron_imports import megatron_datasets
from dsv4_train.data.tokenizer import TextTokenizer, load_tokenizer

_CHUNK_LINES = 256
_PROGRESS_EVERY_S = 2.0

Chunk = List[Tuple[str, int, str]]  # (file name, 1-based line number, raw line)


def parse_document(name: str, line_number: int, line: str, json_key: str) -> str:
    """The document text of one JSONL line; ValueError names the file, line and fix."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}:{line_number}: not valid JSON ({error.msg}). Each line must be one JSON object.") from None
    if not isinstance(record, dict) or json_key not in record:
        keys = ", ".join(map(repr, list(record)[:10])) if isinstance(record, dict) else f"a {type(record).__name__}"
        raise ValueError(
            f"{name}:{line_number}: no key {json_key!r} (found {keys}). Pass --json-key with the field that "
            f"holds the document text."
        )
    text = record[json_key]
    if not isinstance(text, str):
        raise ValueError(f"{name}:{line_number}: {json_key!r} is a {type(text).__name__}, not a string.")
    return text


# Worker state: each worker process loads the tokenizer once.
_worker_tokenizer: Optional[TextTokenizer] = None
_worker_json_key = "text"


def _init_worker(tokenizer_path: str, eod_token: Optional[str], json_key: str, in_pool: bool) -> None:
    global _worker_tokenizer, _worker_json_key
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _worker_tokenizer = load_tokenizer(tokenizer_path, vocab_size=None, eod_token=eod_token, field_name="--tokenizer")
    _worker_json_key = json_key


def _encode_chunk(chunk: Chunk) -> Tuple[List[List[int]], int]:
    assert _worker_tokenizer is not None
    texts = [parse_document(name, number, line, _worker_json_key) for name, number, line in chunk]
    return _worker_tokenizer.encode_batch(texts), sum(len(line) for _, _, line in chunk)


def _chunks(inputs: Sequence[Path]) -> Iterator[Chunk]:
    chunk: Chunk = []
    for path in inputs:
        with open(path, "r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    chunk.append((path.name, number, line))
                    if len(chunk) == _CHUNK_LINES:
                        yield chunk
                        chunk = []
    if chunk:
        yield chunk


class _Progress:
    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = self.last = time.perf_counter()
        self.bytes = 0

    def update(self, documents: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            rate = self.bytes / max(now - self.started, 1e-9) / 1e6
            print(f"[preprocess] {documents} documents, {tokens} tokens, {rate:.1f} MB/s", file=self.stream, flush=True)


def preprocess(*, inputs: Sequence[str], output_prefix: str, tokenizer_path: str, json_key: str = "text",
               workers: int = 1, eod_token: Optional[str] = None, progress_stream=sys.stderr):
    """Tokenize JSONL `inputs` into `<output_prefix>.bin/.idx/.meta.json`; returns the written IndexedMeta.

    Raises:
        ValueError: missing/unreadable input, invalid tokenizer, bad JSON line or key, workers < 1.
    """
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1.")
    paths = [Path(p).expanduser() for p in inputs]
    for path in paths:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"--input {str(path)!r}: no such readable file. Give a JSONL file (one JSON object per line).")
    tokenizer = load_tokenizer(tokenizer_path, vocab_size=None, eod_token=eod_token, field_name="--tokenizer")
    prefix = Path(output_prefix).expanduser()
    if prefix.suffix in (".bin", ".idx"):
        raise ValueError(f"--output-prefix {output_prefix!r} should not end in {prefix.suffix}; give the path without extension.")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output-prefix {output_prefix!r}: cannot create {prefix.parent} ({error}).") from None
    # Check the first line in this process so a wrong --json-key fails at once with one clear message.
    first = next(_chunks(paths), None)
    if first is None:
        raise ValueError(f"--input {', '.join(map(str, inputs))}: no documents (the files are empty or blank).")
    parse_document(*first[0], json_key)
    megatron_datasets()  # import Megatron-Core (seconds) before the progress clock starts

    progress = _Progress(progress_stream)

    def encoded(results: Iterator[Tuple[List[List[int]], int]]) -> Iterator[List[int]]:
        for documents, num_bytes in results:
            progress.bytes += num_bytes
            yield from documents

    pool = None
    if workers == 1:
        _init_worker(str(tokenizer.path), tokenizer.eod_token, json_key, False)
        results = map(_encode_chunk, _chunks(paths))
    else:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path), tokenizer.eod_token, json_key, True))
        results = pool.imap(_encode_chunk, _chunks(paths))
    try:
        meta = write_indexed_dataset(
            prefix,
            encoded(results),
            tokenizer_sha256=tokenizer.sha256,
            tokenizer_vocab_size=tokenizer.vocab_size,
            eod=tokenizer.eod,
            source=", ".join(str(p.resolve()) for p in paths),
            on_document=lambda docs, toks: progress.update(docs, toks),
        )
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    progress.update(meta.documents, meta.tokens, force=True)
    return meta


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4-preprocess",
        description="Tokenize JSONL documents into a Megatron indexed dataset (<prefix>.bin/.idx) for data.kind=indexed.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line; read in order")
    parser.add_argument("--output-prefix", required=True, help="output path without extension (writes .bin, .idx, .meta.json)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (Hugging Face tokenizers format)")
    parser.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--eod-token", default=None, help="end-of-document token (default: first known one in the vocabulary)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        meta = preprocess(inputs=args.input, output_prefix=args.output_prefix, tokenizer_path=args.tokenizer,
                          json_key=args.json_key, workers=args.workers, eod_token=args.eod_token)
    except ValueError as error:
        print(f"dsv4-preprocess: error: {error}", file=sys.stderr)
        return 2
    skipped = f", skipped {meta.skipped_empty_documents} empty" if meta.skipped_empty_documents else ""
    print(
        f"dsv4-preprocess: wrote {meta.documents} documents ({meta.tokens} tokens incl. EOD{skipped}) to "
        f"{args.output_prefix}.bin/.idx in {time.perf_counter() - started:.1f}s; train with data.kind=indexed "
        f"data.paths=[{args.output_prefix}] data.tokenizer={args.tokenizer}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
