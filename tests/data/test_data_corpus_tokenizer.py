"""The embedded corpus is pinned byte for byte; the embedded BPE is deterministic; tokenizer errors are clear."""

from __future__ import annotations

import json

import pytest
from data_helpers import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dsv4_train.data import embedded_corpus
from dsv4_train.data.tokenizer import (
    EMBEDDED_EOD,
    check_embedded_vocab_size,
    load_tokenizer,
    train_embedded_tokenizer,
)

# SHA-256 of corpus v1. If this changes, the default run's data changed: bump CORPUS_VERSION (it keys the
# caches) and update this value in the same commit.
CORPUS_V1_SHA256 = "c5ee025795fa296ac7f8f17edae5bf79c2441bdf103cac079cebeaa7b92ae871"


def test_splitmix64_matches_reference_values():
    # Published splitmix64 outputs for seed 0 (the reference C implementation by S. Vigna).
    rng = embedded_corpus.SplitMix64(0)
    assert [rng.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_corpus_is_pinned_and_sized_for_the_default_run():
    assert embedded_corpus.CORPUS_VERSION == 1
    assert embedded_corpus.fingerprint() == CORPUS_V1_SHA256
    docs = list(embedded_corpus.documents())
    assert len(docs) == embedded_corpus.NUM_DOCUMENTS
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 1_000_000 < total < 4_000_000  # "a few MB at most", enough for thousands of 64-token samples
    assert all(d.strip() for d in docs)


def test_embedded_tokenizer_training_is_deterministic(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    train_embedded_tokenizer(first, vocab_size=VOCAB)
    train_embedded_tokenizer(second, vocab_size=VOCAB)
    assert first.read_bytes() == second.read_bytes()
    tok = load_tokenizer(first, vocab_size=VOCAB, eod_token=EMBEDDED_EOD)
    assert tok.vocab_size == VOCAB and tok.eod == 0
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically, nothing left behind


def test_byte_level_round_trip_and_eod(embedded_tokenizer_file):
    tok = load_tokenizer(embedded_tokenizer_file, vocab_size=VOCAB)
    text = "Kesselford lies on the river Alder.\n\tdef f(x): return x * 3  # héllo wörld ✓"
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text  # byte-level BPE is lossless, even outside the training alphabet
    assert tok.eod not in ids  # no special tokens are added by encode
    assert tok.decode([tok.eod]) == EMBEDDED_EOD
    # The corpus' own words are merged: far fewer tokens than bytes.
    corpus_text = next(embedded_corpus.documents())
    assert len(tok.encode(corpus_text)) < 0.6 * len(corpus_text.encode())


def test_large_model_vocab_gives_a_smaller_valid_tokenizer(tmp_path):
    path = tmp_path / "big.json"
    train_embedded_tokenizer(path, vocab_size=129280)
    tok = load_tokenizer(path, vocab_size=129280)
    assert 512 < tok.vocab_size <= 129280  # the BPE stops when no pair is left to merge


def test_missing_tokenizer_file_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*no such file"):
        load_tokenizer(tmp_path / "nope.json", vocab_size=VOCAB)


@pytest.mark.parametrize("content", ['{"version": ', '{"not": "a tokenizer"}', "\x00\x01binary"])
def test_unreadable_tokenizer_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"not a readable tokenizers JSON file") as info:
        load_tokenizer(path, vocab_size=VOCAB)
    assert "\n" not in str(info.value)


def test_tokenizer_larger_than_model_vocab(embedded_tokenizer_file):
    with pytest.raises(ValueError, match=r"has 512 tokens but model\.vocab_size is 300"):
        load_tokenizer(embedded_tokenizer_file, vocab_size=300)


def test_tokenizer_without_eod_token_and_explicit_eod(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 10, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[END]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path / "custom.json"
    tok.save(str(path))
    with pytest.raises(ValueError, match=r"none of .* is in its vocabulary.*data\.eod_token"):
        load_tokenizer(path, vocab_size=VOCAB)
    assert load_tokenizer(path, vocab_size=VOCAB, eod_token="[END]").eod == tok.token_to_id("[END]")
    with pytest.raises(ValueError, match=r"data\.eod_token='<nope>' is"):
        load_tokenizer(path, vocab_size=VOCAB, eod_token="<nope>")


def test_embedded_vocab_must_hold_the_byte_alphabet():
    with pytest.raises(ValueError, match=r"model\.vocab_size=200 is too small.*at least 257"):
        check_embedded_vocab_size(200)
    check_embedded_vocab_size(257)


def test_unique_identifiers_follow_content_not_path(tmp_path, embedded_tokenizer_file):
    copy = tmp_path / "copy.json"
    copy.write_bytes(embedded_tokenizer_file.read_bytes())
    a = load_tokenizer(embedded_tokenizer_file, vocab_size=VOCAB)
    b = load_tokenizer(copy, vocab_size=VOCAB)
    assert json.dumps(a.unique_identifiers) == json.dumps(b.unique_identifiers)
