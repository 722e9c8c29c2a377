"""dsv4-preprocess as users run it (a real subprocess), and the files it writes read back with Megatron."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import VOCAB

from dsv4_train.data.indexed import read_meta
from dsv4_train.data.megatron_imports import megatron_datasets
from dsv4_train.data.preprocess import preprocess
from dsv4_train.data.tokenizer import load_tokenizer

DOCS = [
    "The river Alder flows north.",
    "",  # an empty document is skipped, not written as a lone EOD
    "def f(x):\n    return x + 1\n",
    "Unicode survives: héllo wörld ✓ — 日本",
    "Last one.",
]


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsv4_train.data.preprocess", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def _write_jsonl(path, docs, key="text"):
    lines = [json.dumps({key: d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(2, "   ")  # blank lines are ignored
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_writes_a_megatron_indexed_dataset(tmp_path, embedded_tokenizer_file):
    source = _write_jsonl(tmp_path / "data.jsonl", DOCS)
    result = _cli("--input", str(source), "--output-prefix", str(tmp_path / "out" / "mydata"),
                  "--tokenizer", str(embedded_tokenizer_file), "--json-key", "text", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "[preprocess] 4 documents" in result.stderr  # progress line
    assert "wrote 4 documents" in result.stdout and "skipped 1 empty" in result.stdout
    prefix = tmp_path / "out" / "mydata"
    tokenizer = load_tokenizer(embedded_tokenizer_file, vocab_size=VOCAB)
    dataset = megatron_datasets().IndexedDataset(str(prefix), multimodal=False, mmap=True)
    kept = [d for d in DOCS if d]
    assert len(dataset) == len(kept)
    for i, text in enumerate(kept):
        ids = np.asarray(dataset[i]).tolist()
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == text
    meta = read_meta(prefix)
    assert meta.documents == 4 and meta.tokens == sum(len(np.asarray(dataset[i])) for i in range(4))
    assert meta.tokenizer_sha256 == tokenizer.sha256 and meta.max_token_id < VOCAB
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mydata.bin", "mydata.idx", "mydata.meta.json"]


def test_cli_bad_json_key_is_one_clear_message_and_writes_nothing(tmp_path, embedded_tokenizer_file):
    source = _write_jsonl(tmp_path / "data.jsonl", DOCS, key="body")
    result = _cli("--input", str(source), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer",
                  str(embedded_tokenizer_file))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dsv4-preprocess: error: data.jsonl:1: no key 'text' (found 'body', 'id'). Pass --json-key with the field "
        "that holds the document text."
    ]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_invalid_line_midway_leaves_no_partial_output(tmp_path, embedded_tokenizer_file):
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(600)) + "{broken\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:601: not valid JSON"):
        preprocess(inputs=[str(source)], output_prefix=str(tmp_path / "out" / "x"),
                   tokenizer_path=str(embedded_tokenizer_file), progress_stream=io.StringIO())
    assert list((tmp_path / "out").iterdir()) == []  # temporary .bin/.idx removed, nothing at the prefix


def test_missing_input_and_bad_tokenizer(tmp_path, embedded_tokenizer_file):
    with pytest.raises(ValueError, match=r"--input .*no such readable file"):
        preprocess(inputs=[str(tmp_path / "nope.jsonl")], output_prefix=str(tmp_path / "x"),
                   tokenizer_path=str(embedded_tokenizer_file))
    source = _write_jsonl(tmp_path / "data.jsonl", DOCS)
    (tmp_path / "tok.json").write_text("not json")
    with pytest.raises(ValueError, match=r"--tokenizer=.*not a readable tokenizers JSON file"):
        preprocess(inputs=[str(source)], output_prefix=str(tmp_path / "x"), tokenizer_path=str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match=r"--output-prefix .* should not end in \.bin"):
        preprocess(inputs=[str(source)], output_prefix=str(tmp_path / "x.bin"), tokenizer_path=str(embedded_tokenizer_file))


def test_workers_do_not_change_the_output(tmp_path, embedded_tokenizer_file):
    from dsv4_train.data import embedded_corpus

    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in embedded_corpus.documents(700)))
    for workers in (1, 2):
        preprocess(inputs=[str(source)], output_prefix=str(tmp_path / f"w{workers}"),
                   tokenizer_path=str(embedded_tokenizer_file), workers=workers, progress_stream=io.StringIO())
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
