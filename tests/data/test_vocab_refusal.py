"""Token ids beyond `model.vocab_size` in indexed data are refused before start (data/indexed.py).

With a `<prefix>.meta.json` (dsv4-preprocess) the recorded largest id is compared; without one (data
written by other tools) the `.bin` is scanned (`scan_max_token_id`). Either way the CLI exits 2 with one
message naming the file, the id, the vocabulary and the fix, no traceback, and writes nothing: neither
the run directory nor the data cache is created.
"""

from __future__ import annotations

import numpy
import pytest

from tests.helpers import run_cli

VOCAB = 512  # the default (tiny) model's vocabulary
OUT_OF_VOCAB = 700


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dsv4_train.data.tokenizer import load_tokenizer, train_embedded_tokenizer

    path = tmp_path_factory.mktemp("vocab_tok") / "tokenizer.json"
    train_embedded_tokenizer(path, vocab_size=VOCAB)
    return load_tokenizer(path, vocab_size=VOCAB)


def _documents(bad_at=None):
    """40 documents of in-vocabulary ids; `bad_at=(document, position)` puts OUT_OF_VOCAB there."""
    rng = numpy.random.default_rng(0)
    docs = [rng.integers(1, VOCAB, size=int(rng.integers(5, 60))).tolist() for _ in range(40)]
    if bad_at is not None:
        doc, pos = bad_at
        docs[doc][pos] = OUT_OF_VOCAB
    return docs


def _write(prefix, tokenizer, documents, *, keep_meta: bool):
    from dsv4_train.data.indexed import meta_path, write_indexed_dataset

    write_indexed_dataset(prefix, documents, tokenizer_sha256=tokenizer.sha256, tokenizer_vocab_size=VOCAB,
                          eod=tokenizer.eod, source="test_vocab_refusal")
    if not keep_meta:
        meta_path(prefix).unlink()
    return prefix


@pytest.mark.parametrize("keep_meta", [False, True], ids=["no_meta_scans_bin", "meta_json"])
def test_cli_refuses_ids_beyond_vocab(tokenizer, tmp_path, keep_meta):
    prefix = _write(tmp_path / "data" / "corpus", tokenizer, _documents(bad_at=(17, 3)), keep_meta=keep_meta)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = run_cli(["data=indexed", f"data.paths=[{prefix}]", f"data.tokenizer={tokenizer.path}",
                      f"data.cache_dir={cache}", f"run.dir={run_dir}"], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{prefix}.bin" in result.stderr, result.stderr
    assert f"holds token id {OUT_OF_VOCAB} but model.vocab_size is {VOCAB}" in result.stderr, result.stderr
    assert f"Raise model.vocab_size to > {OUT_OF_VOCAB}" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not run_dir.exists() and not cache.exists()
    assert sorted(p.name for p in prefix.parent.iterdir()) == sorted(
        ["corpus.bin", "corpus.idx"] + (["corpus.meta.json"] if keep_meta else []))


@pytest.mark.parametrize("bad_at", [(0, 0), (20, 10), (39, -1)], ids=["first_token", "middle", "last_document"])
@pytest.mark.parametrize("chunk", [7, 1 << 24], ids=["chunk7", "default_chunk"])
def test_scan_finds_the_largest_id_anywhere(tokenizer, tmp_path, bad_at, chunk):
    """Exact (integer) maximum, whatever chunk boundary the planted id falls on."""
    from dsv4_train.data.indexed import scan_max_token_id

    prefix = _write(tmp_path / "corpus", tokenizer, _documents(bad_at=bad_at), keep_meta=False)
    assert scan_max_token_id(str(prefix), chunk_tokens=chunk) == OUT_OF_VOCAB


def test_in_vocab_data_without_meta_passes(tokenizer, tmp_path):
    from dsv4_train.data.indexed import check_prefix, scan_max_token_id

    documents = _documents()
    prefix = _write(tmp_path / "corpus", tokenizer, documents, keep_meta=False)
    largest = max(max(max(doc) for doc in documents), tokenizer.eod)
    assert scan_max_token_id(str(prefix), chunk_tokens=5) == largest
    assert check_prefix(str(prefix), tokenizer_sha256=tokenizer.sha256, tokenizer_path=str(tokenizer.path),
                        vocab_size=VOCAB) is None
    with pytest.raises(ValueError, match=rf"corpus.bin holds token id {largest} but model.vocab_size is {largest}\."):
        check_prefix(str(prefix), tokenizer_sha256=tokenizer.sha256, tokenizer_path=str(tokenizer.path),
                     vocab_size=largest)
