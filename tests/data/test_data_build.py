"""build_data end to end on real files: embedded corpus -> BPE -> .bin/.idx -> Megatron GPTDataset -> batches."""

from __future__ import annotations

import io
import json

import pytest
import torch
from data_helpers import VOCAB, data_config, train_config

from dsv4_train.data import build_data, embedded_corpus
from dsv4_train.data.preprocess import preprocess
from dsv4_train.data.tokenizer import embedded_tokenizer_path


def _batches(cache, *, seed=1, dp_rank=0, dp_size=1, consumed=0, cfg=None, **data_overrides):
    data = build_data(data_cfg=data_config(cache, **data_overrides), train_cfg=cfg or train_config(), vocab_size=VOCAB,
                      seed=seed, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed)
    return data, list(data.train_iterator)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_have_the_contract_shapes_and_dtypes(data_cache):
    cfg = train_config()
    data, batches = _batches(data_cache, cfg=cfg)
    assert data.micro_batches == len(batches) == cfg.max_steps * cfg.global_batch_size // cfg.micro_batch_size
    for batch in batches:
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
        for key in ("tokens", "labels", "position_ids"):
            assert batch[key].dtype == torch.long and batch[key].shape == (cfg.micro_batch_size, cfg.seq_length)
        assert batch["loss_mask"].dtype == torch.float32 and batch["loss_mask"].shape == (cfg.micro_batch_size, cfg.seq_length)
        assert int(batch["tokens"].max()) < VOCAB and int(batch["tokens"].min()) >= 0
        assert torch.equal(batch["position_ids"], torch.arange(cfg.seq_length).expand(cfg.micro_batch_size, -1))
        assert torch.all(batch["loss_mask"] == 1.0)  # no padding in training samples, EOD is not masked
    assert data.tokenizer.vocab_size == VOCAB and data.tokenizer.eod == 0
    summary = data.describe()
    assert "embedded corpus v1" in summary and "4000 documents" in summary and str(data_cache) in summary


def test_labels_are_tokens_shifted_by_one_and_come_from_the_corpus(data_cache):
    data, batches = _batches(data_cache)
    corpus = "\0".join(embedded_corpus.documents())
    eod = data.tokenizer.eod
    saw_document_boundary = False
    for batch in batches:
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        for tokens, labels in zip(batch["tokens"], batch["labels"]):
            stream = tokens.tolist() + [int(labels[-1])]  # the seq+1 window Megatron cut from the documents
            pieces, current = [], []
            for token in stream:
                if token == eod:
                    pieces.append(current)
                    current = []
                    saw_document_boundary = True
                else:
                    current.append(token)
            pieces.append(current)
            for piece in pieces:
                # Every run between EODs is a stretch of one corpus document (the corpus is ASCII, so no
                # partial UTF-8 characters at the cut points).
                assert data.tokenizer.decode(piece) in corpus
    assert saw_document_boundary


def test_same_seed_same_batches_other_seed_other_batches(data_cache, tmp_path):
    _, first = _batches(data_cache, seed=7)
    _, again = _batches(data_cache, seed=7)
    _, fresh_cache = _batches(tmp_path / "fresh", seed=7)  # rebuilt from scratch: tokenizer, .bin, indices
    _, other = _batches(data_cache, seed=8)
    assert _same(first, again) and _same(first, fresh_cache)
    assert not _same(first, other)


def test_data_parallel_ranks_split_each_global_batch_like_megatron(data_cache):
    cfg = train_config(global_batch_size=8, micro_batch_size=2)
    _, dp1 = _batches(data_cache, cfg=cfg)
    _, rank0 = _batches(data_cache, cfg=cfg, dp_rank=0, dp_size=2)
    _, rank1 = _batches(data_cache, cfg=cfg, dp_rank=1, dp_size=2)
    assert len(rank0) == len(rank1) == len(dp1) // 2
    # Megatron order: micro-batch k of rank r holds samples [(k * dp + r) * mbs, ... + mbs) of the stream.
    interleaved = [batch for pair in zip(rank0, rank1) for batch in pair]
    assert _same(interleaved, dp1)
    # Hence every optimizer step (gbs=8 samples = 4 dp1 micro-batches = 2 per rank) sees the same samples.
    for step in range(cfg.max_steps):
        dp1_tokens = torch.cat([b["tokens"] for b in dp1[4 * step:4 * step + 4]])
        dp2_tokens = torch.cat([b["tokens"] for r in (rank0, rank1) for b in r[2 * step:2 * step + 2]])
        assert sorted(map(tuple, dp1_tokens.tolist())) == sorted(map(tuple, dp2_tokens.tolist()))


def test_resume_from_consumed_samples_continues_the_stream(data_cache):
    cfg = train_config()
    _, full = _batches(data_cache, cfg=cfg)
    consumed = 2 * cfg.global_batch_size
    data, resumed = _batches(data_cache, cfg=cfg, consumed=consumed)
    assert data.micro_batches == len(full) - consumed // cfg.micro_batch_size
    assert _same(resumed, full[consumed // cfg.micro_batch_size:])
    _, rank1 = _batches(data_cache, cfg=cfg, consumed=consumed, dp_rank=1, dp_size=2)
    assert _same(rank1, full[consumed // cfg.micro_batch_size:][1::2])


def test_dataloader_workers_give_the_same_batches(data_cache):
    _, inline = _batches(data_cache)
    _, workers = _batches(data_cache, num_workers=1)
    assert _same(inline, workers)


def test_interrupted_index_cache_is_rebuilt_not_trusted(data_cache, tmp_path):
    cache = tmp_path / "cache"
    _, reference = _batches(cache)
    (index_dir,) = (cache / "indices").iterdir()
    (index_dir / ".complete").unlink()
    shuffle = next(index_dir.glob("*-GPTDataset-train-shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[:100])  # a crash mid-write
    _, rebuilt = _batches(cache)
    assert _same(reference, rebuilt)
    assert (index_dir / ".complete").is_file()


def test_mock_kind_uses_megatron_mock_dataset(data_cache):
    data, batches = _batches(data_cache, kind="mock")
    assert "MockGPTDataset" in data.describe()
    assert len(batches) == data.micro_batches and batches[0]["tokens"].shape == (2, 64)
    assert torch.equal(batches[0]["labels"][:, :-1], batches[0]["tokens"][:, 1:])
    assert int(batches[0]["tokens"].max()) < VOCAB


def _jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def test_indexed_kind_blends_weighted_datasets(data_cache, embedded_tokenizer_file, tmp_path):
    stories = [d for d in embedded_corpus.documents(600)]
    shouting = [f"ZEBRA {i} ZEBRA {i * 7} ZEBRA" * 3 for i in range(300)]
    for name, texts in (("a", stories), ("b", shouting)):
        preprocess(inputs=[str(_jsonl(tmp_path / f"{name}.jsonl", texts))], output_prefix=str(tmp_path / name),
                   tokenizer_path=str(embedded_tokenizer_file), progress_stream=io.StringIO())
    data, batches = _batches(data_cache, kind="indexed", tokenizer=str(embedded_tokenizer_file),
                             paths=[f"0.5 {tmp_path / 'a'}", f"0.5 {tmp_path / 'b'}"], split="90,10,0")
    texts = [data.tokenizer.decode(row.tolist()) for b in batches for row in b["tokens"]]
    zebra = sum("ZEBRA" in t for t in texts)
    assert 0 < zebra < len(texts)  # both datasets contribute (weights 0.5/0.5 over 48 samples)
    assert "0.5x" in data.describe() and "900 documents" in data.describe()


# --- user errors: one clear ValueError, raised before any expensive work -------------------------------------


def _error(cache, vocab=VOCAB, cfg=None, consumed=0, dp_size=1, **data_overrides) -> str:
    with pytest.raises(ValueError) as info:
        build_data(data_cfg=data_config(cache, **data_overrides), train_cfg=cfg or train_config(), vocab_size=vocab,
                   seed=1, dp_rank=0, dp_size=dp_size, consumed_samples=consumed)
    message = str(info.value)
    assert "\n" not in message  # a single paragraph
    return message


def test_missing_dataset_path(data_cache, embedded_tokenizer_file, tmp_path):
    message = _error(data_cache, kind="indexed", tokenizer=str(embedded_tokenizer_file), paths=[str(tmp_path / "nope")])
    assert "data.paths entry" in message and ".bin, nope.idx not found" in message and "dsv4-preprocess" in message


def test_errors_come_before_any_preparation(tmp_path):
    cache = tmp_path / "untouched"
    assert "too small for the embedded byte-level BPE" in _error(cache, vocab=200)
    assert "data.split='abc'" in _error(cache, split="abc")
    assert "data.kind='web'" in _error(cache, kind="web")
    assert "data.paths=['/x'] is set but data.kind=embedded ignores it" in _error(cache, paths=["/x"])
    assert "needs data.tokenizer" in _error(cache, kind="indexed", paths=["/x"])
    assert "not a multiple of train.micro_batch_size=2 x data-parallel size 3" in _error(cache, dp_size=3)
    assert "consumed_samples=3" in _error(cache, consumed=3)
    assert not (cache / "tokenizers").exists() and not (cache / "indices").exists()


def test_user_tokenizer_larger_than_model_vocab(data_cache, embedded_tokenizer_file):
    message = _error(data_cache, vocab=300, kind="indexed", tokenizer=str(embedded_tokenizer_file), paths=["/x"])
    assert "has 512 tokens but model.vocab_size is 300" in message


def test_dataset_from_another_tokenizer_is_refused(data_cache, tmp_path):
    from dsv4_train.data.tokenizer import train_embedded_tokenizer

    other = tmp_path / "other.json"
    train_embedded_tokenizer(other, vocab_size=300)
    preprocess(inputs=[str(_jsonl(tmp_path / "d.jsonl", ["some text"] * 20))], output_prefix=str(tmp_path / "d"),
               tokenizer_path=str(other), progress_stream=io.StringIO())
    message = _error(data_cache, kind="indexed", tokenizer=str(embedded_tokenizer_path(data_cache, VOCAB)),
                     paths=[str(tmp_path / "d")])
    assert "was tokenized with a different tokenizer" in message


def test_split_without_documents(data_cache, embedded_tokenizer_file, tmp_path):
    preprocess(inputs=[str(_jsonl(tmp_path / "few.jsonl", ["one small document"] * 10))],
               output_prefix=str(tmp_path / "few"), tokenizer_path=str(embedded_tokenizer_file),
               progress_stream=io.StringIO())
    message = _error(data_cache, kind="indexed", tokenizer=str(embedded_tokenizer_file), paths=[str(tmp_path / "few")])
    assert "gives the valid split" in message and "no documents (it has 10)" in message


def test_rewritten_dataset_gets_fresh_indices(data_cache, embedded_tokenizer_file, tmp_path):
    prefix = tmp_path / "d"

    def write(texts):
        preprocess(inputs=[str(_jsonl(tmp_path / "d.jsonl", texts))], output_prefix=str(prefix),
                   tokenizer_path=str(embedded_tokenizer_file), progress_stream=io.StringIO())

    def first_sample():
        data, batches = _batches(data_cache, kind="indexed", tokenizer=str(embedded_tokenizer_file),
                                 paths=[str(prefix)], split="1")
        return data.tokenizer.decode(batches[0]["tokens"][0].tolist())

    write([f"alpha {i} " * 30 for i in range(50)])
    assert "alpha" in first_sample()
    write([f"omega {i} " * 5 for i in range(400)])  # same prefix, other documents and lengths
    after = first_sample()
    assert "omega" in after and "alpha" not in after


def test_document_mask_adds_segments_ending_at_each_eod(data_cache):
    from dsv4_train.data.build import segments_from_eod

    assert segments_from_eod(torch.tensor([[5, 0, 7, 7, 0, 0, 3]]), eod=0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    data, batches = _batches(data_cache, document_mask=True)
    boundaries = 0
    for batch in batches:
        segments = batch["segment_ids"]
        assert torch.equal(segments, segments_from_eod(batch["tokens"], data.tokenizer.eod))
        assert bool((segments[:, 1:] >= segments[:, :-1]).all())
        boundaries += int((segments[:, 1:] != segments[:, :-1]).sum())
    assert boundaries > 0  # the embedded corpus packs several documents per sample


def test_document_mask_refuses_data_without_the_eod_token(embedded_tokenizer_file, tmp_path):
    """Documents that end with another token than the tokenizer's EOD (here id 7) would silently give
    one document per sample: refused before the run, naming the data and the token."""
    from dsv4_train.data.checks import check_data_inputs
    from dsv4_train.data.indexed import write_indexed_dataset
    from dsv4_train.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_tokenizer_file), vocab_size=VOCAB)
    documents = [[11, 12, 13, 14]] * 20
    for name, eod in (("good", tokenizer.eod), ("bad", 7)):
        write_indexed_dataset(tmp_path / name, documents, tokenizer_sha256=tokenizer.sha256,
                              tokenizer_vocab_size=VOCAB, eod=eod, source="test")
    config = dict(kind="indexed", tokenizer=str(embedded_tokenizer_file), document_mask=True)
    check_data_inputs(data_cfg=data_config(tmp_path, paths=[str(tmp_path / "good")], **config), vocab_size=VOCAB)
    with pytest.raises(ValueError) as error:
        check_data_inputs(data_cfg=data_config(tmp_path, paths=[str(tmp_path / "bad")], **config), vocab_size=VOCAB)
    assert f"no document of data.paths entry {str(tmp_path / 'bad')!r} ends with the EOD token" in str(error.value)
    assert f"(id {tokenizer.eod})" in str(error.value)
    # Without document masks the same data is fine.
    check_data_inputs(data_cfg=data_config(tmp_path, paths=[str(tmp_path / "bad")], kind="indexed",
                                           tokenizer=str(embedded_tokenizer_file)), vocab_size=VOCAB)
