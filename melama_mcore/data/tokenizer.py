"""One tokenizer interface over a sentencepiece `.model` file or a Hugging Face tokenizer folder.

`encode` never adds BOS/EOS: callers (the preprocessor, the trainer) decide where special tokens
go, so the same ids come out whichever backend is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from melama_mcore.errors import DataError


class Tokenizer:
    """A loaded tokenizer: ids of the special tokens, and encode/decode without special tokens."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None

    def __init__(self, path: str, backend, *, vocab_size: int, bos_id, eos_id, pad_id, kind: str):
        self.path = path
        self.kind = kind  # "sentencepiece" or "hf"
        self._backend = backend
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            # num_threads=1: parallelism comes from worker processes, not from sentencepiece threads.
            return self._backend.encode(list(texts), num_threads=self._num_threads)
        return self._backend(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path!r}, vocab_size={self.vocab_size})"


def _optional_id(value) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _load_sentencepiece(path: str, num_threads: int) -> Tokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path}: not a usable sentencepiece model ({err})") from None
    eos = _optional_id(processor.eos_id())
    if eos is None:
        raise DataError(f"{path}: the sentencepiece model has no EOS token (eos_id=-1); "
                        "LLaMA-style training needs one to separate documents")
    tok = Tokenizer(path, processor, vocab_size=processor.vocab_size(),
                    bos_id=_optional_id(processor.bos_id()), eos_id=eos,
                    pad_id=_optional_id(processor.pad_id()), kind="sentencepiece")
    tok._num_threads = num_threads
    return tok


def _load_hf(path: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer  # imported lazily: heavy, and optional
    except ImportError:
        raise DataError(f"{path}: a tokenizer folder needs the `transformers` package "
                        "(pip install melama-mcore[hf]); or pass a sentencepiece .model file") from None
    try:
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types for unusable folders
        raise DataError(f"{path}: not a usable Hugging Face tokenizer folder ({type(err).__name__}: {err})") from None
    if backend.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no EOS token; LLaMA-style training needs one")
    return Tokenizer(path, backend, vocab_size=len(backend), bos_id=_optional_id(backend.bos_token_id),
                     eos_id=int(backend.eos_token_id), pad_id=_optional_id(backend.pad_token_id), kind="hf")


def load_tokenizer(path: str, *, num_threads: int = -1) -> Tokenizer:
    """A `.model` file -> sentencepiece; a folder -> Hugging Face. DataError when unusable.

    num_threads applies to sentencepiece batch encoding (-1: all cores).
    """
    path = os.fspath(path)
    p = Path(path)
    if p.is_dir():
        return _load_hf(path)
    if p.is_file():
        return _load_sentencepiece(path, num_threads)
    raise DataError(f"{path}: tokenizer not found (expected a sentencepiece .model file or a "
                    "Hugging Face tokenizer folder)")
