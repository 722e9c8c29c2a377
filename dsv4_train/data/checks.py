"""Read-only checks of a run's data inputs, cheap enough to run before anything is built or written.

The entry point calls `check_data_inputs` during pre-flight (before Hydra creates the run
directory); `build_data` repeats the relevant checks itself, so a tool calling it directly is safe.
"""

from __future__ import annotations

import os

from dsv4_train.data.indexed import check_prefix, parse_blend
from dsv4_train.data.tokenizer import check_embedded_vocab_size, load_tokenizer

KINDS = ("embedded", "indexed", "mock")


def check_data_inputs(*, data_cfg, vocab_size: int) -> None:
    """Raise ValueError naming the field or file for a data input the run could not use."""
    if data_cfg.kind not in KINDS:
        raise ValueError(f"data.kind={data_cfg.kind!r} is not one of {', '.join(KINDS)}.")
    if data_cfg.kind == "mock":
        return
    tokenizer = None
    if data_cfg.tokenizer:
        tokenizer = load_tokenizer(data_cfg.tokenizer, vocab_size=vocab_size,
                                   eod_token=getattr(data_cfg, "eod_token", None))
    elif data_cfg.kind == "embedded":
        check_embedded_vocab_size(vocab_size)
    if data_cfg.kind != "indexed":
        return
    prefixes, _weights = parse_blend(list(data_cfg.paths))
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ValueError(
                f"data.paths entry {prefix!r}: {' and '.join(prefix + ext for ext in missing)} not found. "
                f"Create the dataset with `dsv4-preprocess --input data.jsonl --output-prefix {prefix} "
                "--tokenizer tokenizer.json`, or fix the path (a prefix, without .bin/.idx)."
            )
    if tokenizer is None:
        raise ValueError(
            "data.kind=indexed needs data.tokenizer: the tokenizer.json the datasets in data.paths were "
            "preprocessed with (dsv4-preprocess --tokenizer)."
        )
    for prefix in prefixes:
        check_prefix(prefix, tokenizer_sha256=tokenizer.sha256, tokenizer_path=str(data_cfg.tokenizer),
                     vocab_size=vocab_size)
        if getattr(data_cfg, "document_mask", False):
            check_documents_end_with_eod(prefix, eod=tokenizer.eod, eod_token=tokenizer.eod_token)


def check_documents_end_with_eod(prefix: str, *, eod: int, eod_token: str, samples: int = 64) -> None:
    """data.document_mask finds document boundaries by the EOD token: refuse data whose documents do
    not end with it (e.g. preprocessed without appending EOD, or with another end token); the masks
    would silently be one document per sample. Reads the last token of up to `samples` documents."""
    from dsv4_train.data.megatron_imports import megatron_datasets

    dataset = megatron_datasets().IndexedDataset(prefix, mmap=True)
    count = len(dataset)
    picks = sorted({i * count // samples for i in range(min(samples, count))})
    if picks and not any(int(dataset.get(i, offset=int(dataset.sequence_lengths[i]) - 1, length=1)[0]) == eod
                         for i in picks):
        raise ValueError(
            f"data.document_mask=true, but no document of data.paths entry {prefix!r} ends with the EOD token "
            f"{eod_token!r} (id {eod}) of data.tokenizer, so document boundaries cannot be found. Re-run "
            "dsv4-preprocess (it appends EOD to every document), set data.eod_token to the token that ends "
            "the documents in this data, or set data.document_mask=false."
        )
