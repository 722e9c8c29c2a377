"""Tokenizers: the embedded byte-level BPE (trained once on the embedded corpus) or a user `tokenizer.json`.

Both are `tokenizers.Tokenizer` objects (the Hugging Face Rust library) behind `TextTokenizer`, which
exposes what the training loop needs (`encode`, `decode`, `vocab_size`, `eod`) and what Megatron-Core's
GPT datasets read from `GPTDatasetConfig.tokenizer` (`vocab_size`, `eod`, `unique_identifiers`; no
`pad`, so Megatron pads with -1 and masks it out of the loss). Megatron's own HF tokenizer wrapper needs
`transformers`, which is a test-only dependency here, hence this small duck-typed adapter.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4_train.data import embedded_corpus
from dsv4_train.data.cache import temporary_sibling

EMBEDDED_EOD = "<|endoftext|>"
# End-of-document tokens of common tokenizer families, tried in order when data.eod_token is None.
KNOWN_EOD_TOKENS = (
    "<|endoftext|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek (V3/V4)
    "<|end_of_text|>",  # Llama 3
    "</s>",  # Llama 2, Mistral, T5
    "<eos>",  # Gemma
    "<|eos|>",
)
_BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from all 256 byte symbols


class TextTokenizer:
    """A `tokenizers.Tokenizer` with a known end-of-document id.

    Attributes:
        path: the tokenizer.json it was loaded from.
        vocab_size: number of ids the tokenizer can produce (including added/special tokens).
        eod: id appended after every document.
        sha256: hash of the tokenizer.json bytes (keys caches; recorded by dsv4-preprocess).
    """

    def __init__(self, *, tokenizer: Tokenizer, path: Path, eod_token: str, sha256: str) -> None:
        self._tokenizer = tokenizer
        self.path = path
        self.eod_token = eod_token
        eod = tokenizer.token_to_id(eod_token)
        assert eod is not None, f"{eod_token!r} was checked to be in the vocabulary"
        self.eod = int(eod)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.sha256 = sha256

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without any special tokens (documents are separated by `eod` only)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: List[int]) -> str:
        """Text of `ids`, special tokens kept visible (useful when logging samples)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What Megatron's dataset cache key serialises for the tokenizer (content, not path)."""
        return OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256), ("eod", self.eod), ("vocab_size", self.vocab_size)]
        )

    def __repr__(self) -> str:
        return f"TextTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer(path: str | os.PathLike, *, vocab_size: Optional[int], eod_token: Optional[str] = None,
                   field_name: str = "data.tokenizer") -> TextTokenizer:
    """Load and validate a tokenizer.json (cheap; call before any expensive work).

    Args:
        path: a `tokenizers` JSON file (the `tokenizer.json` of a Hugging Face model, or one saved by
            `tokenizers.Tokenizer.save`).
        vocab_size: the model's vocabulary size; the tokenizer may not produce ids >= it. None skips the check.
        eod_token: the end-of-document token; None tries `KNOWN_EOD_TOKENS`.
        field_name: the config field or CLI flag named in error messages.

    Raises:
        ValueError: missing/unreadable/invalid file, vocabulary larger than the model's, no EOD token.
    """
    file = Path(path).expanduser()
    or_embedded = ", or leave it unset to use the embedded byte-level BPE" if field_name == "data.tokenizer" else ""
    if not file.is_file():
        raise ValueError(
            f"{field_name}={str(path)!r}: no such file. Point {field_name} at a tokenizers JSON file "
            f"(e.g. a model's tokenizer.json){or_embedded}."
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust library raises plain Exception subclasses for every parse error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{field_name}={str(path)!r} is not a readable tokenizers JSON file ({first_line}). "
            f"Use the tokenizer.json of a Hugging Face tokenizer (saved with the `tokenizers` library){or_embedded}."
        ) from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise ValueError(
            f"{field_name}={str(path)!r} has {size} tokens but model.vocab_size is {vocab_size}, so some "
            f"token ids would have no embedding row. Set model.vocab_size >= {size} (Megatron pads it "
            f"further as needed) or use a tokenizer with at most {vocab_size} tokens."
        )
    candidates = (eod_token,) if eod_token else KNOWN_EOD_TOKENS
    chosen = next((name for name in candidates if tokenizer.token_to_id(name) is not None), None)
    if chosen is None:
        which = f"data.eod_token={eod_token!r} is" if eod_token else f"none of {', '.join(KNOWN_EOD_TOKENS)} is"
        raise ValueError(
            f"{field_name}={str(path)!r}: {which} in its vocabulary, so documents cannot be separated. "
            f"Set data.eod_token (dsv4-preprocess: --eod-token) to the tokenizer's end-of-document token."
        )
    return TextTokenizer(tokenizer=tokenizer, path=file.resolve(), eod_token=chosen, sha256=_sha256_of(file))


def check_embedded_vocab_size(vocab_size: int) -> None:
    """The embedded BPE needs room for the 256 byte symbols plus the EOD token."""
    minimum = _BYTE_ALPHABET_SIZE + 1
    if vocab_size < minimum:
        raise ValueError(
            f"model.vocab_size={vocab_size} is too small for the embedded byte-level BPE tokenizer, which "
            f"needs at least {minimum} ids (256 bytes + the end-of-document token). Raise model.vocab_size "
            f"to >= {minimum} or set data.tokenizer to your own tokenizer.json."
        )


def embedded_tokenizer_path(cache_dir: Path, vocab_size: int) -> Path:
    return cache_dir / "tokenizers" / f"embedded-v{embedded_corpus.CORPUS_VERSION}-bytebpe-{vocab_size}.json"


def train_embedded_tokenizer(out_path: Path, *, vocab_size: int) -> None:
    """Train the byte-level BPE on the embedded corpus and write it atomically to `out_path`.

    Deterministic: same corpus, same trainer settings => byte-identical JSON (checked in tests). The BPE
    stops early when the corpus has no pair left to merge (~6.8k tokens), so a large model vocabulary
    gets a smaller tokenizer, which is valid (vocab_size is an upper bound).
    """
    check_embedded_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EMBEDDED_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(embedded_corpus.documents(), trainer=trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_path)
    try:
        tokenizer.save(str(tmp))
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
