"""One tokenizer interface over a sentencepiece `.model` file or a Hugging Face tokenizer folder.

`encode` never adds BOS/EOS: callers (the preprocessor, the trainer) decide where special tokens
go, so the same ids come out whichever backend is used.

Long texts: sentencepiece needs ~50 bytes of memory per character of the text it encodes (10 GB
for one 200 MB document), a Hugging Face fast tokenizer ~150 (and a quarter of its usual speed).
`iter_encode` encodes a long text in pieces of about LONG_TEXT_CHARS characters, cut where no token
can straddle the cut, so its ids equal those of the whole text (see `_space_cut`, `_hf_space_cut`);
memory then follows the piece, not the document.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from melama_mcore.errors import DataError

# Pieces of 16 Ki characters keep the speed of ordinary documents: both sentencepiece and a Hugging
# Face BPE without a pre-tokenizer (LLaMA's tokenizer.json) slow down on longer inputs, the latter
# to half its rate at 64 Ki and a quarter at 1 Mi (benchmarks/RESULTS.md). 16 pieces per call: a few
# MB of tokenizer memory.
LONG_TEXT_CHARS = 1 << 14
PIECES_PER_CALL = 16
_SPACE = "\u2581"  # sentencepiece's whitespace symbol
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")  # one space between two non-space characters
# Files a Hugging Face tokenizer folder holds (one suffices for AutoTokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                      "spiece.model", "vocab.txt")


class Tokenizer:
    """A loaded tokenizer: ids of the special tokens, and encode/decode without special tokens."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None

    def __init__(self, path: str, backend, *, vocab_size: int, bos_id, eos_id, pad_id, kind: str,
                 space_cut: str | None = None):
        self.path = path
        self.kind = kind  # "sentencepiece" or "hf"
        self._backend = backend
        self._space_cut = space_cut  # see _space_cut
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

    def iter_encode(self, text: str) -> Iterator[list[int]]:
        """encode(text) in consecutive parts: a text over LONG_TEXT_CHARS is encoded in pieces when the
        model allows cutting it with the same ids (see _space_cut), else whole. Pieces go to the
        tokenizer PIECES_PER_CALL at a time (a Hugging Face tokenizer encodes a batch on all cores)."""
        pieces = self._pieces(text)
        while group := list(itertools.islice(pieces, PIECES_PER_CALL)):
            yield from self.encode_batch(group)

    def _pieces(self, text: str) -> Iterator[str]:
        start = 0
        while self._space_cut is not None and len(text) - start > LONG_TEXT_CHARS:
            cut = _SAFE_CUT.search(text, start + LONG_TEXT_CHARS)
            if cut is None:  # no space left: the rest is encoded in one piece
                break
            yield text[start:cut.start()]
            # "drop": the model's dummy prefix gives the next piece the space it starts with in the text.
            start = cut.start() + (1 if self._space_cut == "drop" else 0)
        yield text[start:]

    @functools.cached_property
    def vocab_sha256(self) -> str | None:
        """The vocabulary's identity, whatever file holds it: sha256 of its pieces in id order,
        NUL-separated (the digest checkpoints record, checkpoint/integrity.py). Two tokenizers with
        the same digest give every id the same piece; None when the backend cannot list its pieces."""
        if hasattr(self._backend, "id_to_piece"):
            pieces = [self._backend.id_to_piece(i) for i in range(self.vocab_size)]
        elif hasattr(self._backend, "convert_ids_to_tokens"):
            pieces = self._backend.convert_ids_to_tokens(list(range(self.vocab_size)))
        else:
            return None
        return hashlib.sha256("\0".join(map(str, pieces)).encode()).hexdigest()

    def record(self) -> dict:
        """What a dataset's marker records about the tokenizer that wrote it (data/provenance.py)."""
        return {"path": str(self.path), "vocab_size": self.vocab_size, "vocab_sha256": self.vocab_sha256,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    @property
    def special_texts(self) -> dict[str, int]:
        """Text that `encode_with_offsets` reads as one special token: a sentencepiece model's BOS
        and EOS pieces (`<s>`, `</s>`), a Hugging Face tokenizer's added tokens."""
        if self.kind == "hf":
            return dict(self._backend.added_tokens_encoder)
        ids = [i for i in (self.bos_id, self.eos_id) if i is not None]
        return {self._backend.id_to_piece(i): i for i in ids}

    @property
    def chat_template(self) -> str | None:
        """A Hugging Face tokenizer folder's own chat template (None for sentencepiece or none)."""
        template = getattr(self._backend, "chat_template", None) if self.kind == "hf" else None
        return template if isinstance(template, str) else None

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        """Per text: (ids, start, end), each token's [start, end) character offsets in the text, with
        special-token text (see `special_texts`) read as the special token. A Hugging Face tokenizer
        encodes the whole text, as its apply_chat_template does; a sentencepiece model encodes each
        run between special tokens on its own, as Meta's LLaMA-2 chat code encodes each turn."""
        if not texts:
            return []
        if self.kind == "hf":
            out = self._backend(list(texts), add_special_tokens=False, return_offsets_mapping=True)
            return [(ids, *_offset_arrays(offsets, len(ids)))
                    for ids, offsets in zip(out["input_ids"], out["offset_mapping"])]
        specials = self.special_texts
        splitter = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
        layouts, runs = [], []  # per text: (special id or None, char offset, run) in order
        for text in texts:
            layout, position = [], 0
            for match in splitter.finditer(text):
                if match.start() > position:
                    layout.append((None, position, text[position:match.start()]))
                layout.append((specials[match.group()], match.start(), match.group()))
                position = match.end()
            if position < len(text):
                layout.append((None, position, text[position:]))
            runs.extend(run for special, _, run in layout if special is None)
            layouts.append(layout)
        protos = iter(self._backend.encode(runs, out_type="proto", num_threads=self._num_threads) if runs else [])
        results = []
        for layout in layouts:
            ids, starts, ends = [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            for special, offset, run in layout:
                if special is not None:
                    ids.append(special)
                    starts.append(np.array([offset]))
                    ends.append(np.array([offset + len(run)]))
                    continue
                # one pass over the pieces (per-piece attribute reads are most of the cost here)
                triples = np.array([(p.id, p.begin, p.end) for p in next(protos).pieces], np.int64).reshape(-1, 3)
                ids.extend(triples[:, 0].tolist())
                char_of_byte = _char_index_of_bytes(run)
                starts.append(offset + char_of_byte[triples[:, 1]])
                ends.append(offset + char_of_byte[triples[:, 2]])
            results.append((ids, np.concatenate(starts), np.concatenate(ends)))
        return results

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path!r}, vocab_size={self.vocab_size})"


def _offset_arrays(offsets, n: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    return pairs[:, 0], pairs[:, 1]


def _char_index_of_bytes(text: str) -> np.ndarray:
    """For each UTF-8 byte offset 0..len(bytes) of `text`: the character offset it falls in
    (sentencepiece reports byte offsets)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    char_starts = (data & 0xC0) != 0x80  # every byte that is not a continuation byte starts a character
    return np.concatenate([[0], np.cumsum(char_starts)])


def _optional_id(value) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _space_cut(processor) -> str | None:
    """How a text may be cut at a space between two words with ids unchanged, for this model:
    "drop" the space (the model prefixes every text with one), "keep" it, or None (never cut).

    sentencepiece writes a space as U+2581. When no piece has U+2581 after another character, no token
    can span the boundary before "\u2581word", so the ids left and right of it do not depend on each
    other; the identity normaliser maps character by character, so cutting the text there cuts the
    normalised text there. A piece encoded alone starts with the model's dummy prefix U+2581 when it
    adds one: then the space is dropped from the piece; without the prefix, the piece keeps its space
    (unless extra whitespace is removed, which would strip it).
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    norm = proto.normalizer_spec
    if (norm.name != "identity" or not norm.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix
            or any(_SPACE in piece.piece.lstrip(_SPACE) for piece in proto.pieces)):
        return None
    if norm.add_dummy_prefix:
        return "drop"
    return None if norm.remove_extra_whitespaces else "keep"


def _hf_space_cut(backend) -> str | None:
    """_space_cut for a Hugging Face fast tokenizer built as sentencepiece models are (LLaMA's
    tokenizer.json: spaces written as U+2581 by a Replace normaliser or a Metaspace pre-tokeniser, a
    BPE or Unigram vocabulary): the same reasoning holds, read from its tokenizer.json. Anything else
    (byte-level BPE, WordPiece, other normalisers, added tokens that strip spaces) is never cut."""
    inner = getattr(backend, "backend_tokenizer", None)
    if inner is None:
        return None
    spec = json.loads(inner.to_str())
    model = spec.get("model") or {}
    word_marks = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    if model.get("type") == "BPE" and not word_marks:
        pieces = list(model.get("vocab") or {})
    elif model.get("type") == "Unigram":
        pieces = [piece for piece, _ in model.get("vocab") or []]
    else:
        return None
    if any(_SPACE in piece.lstrip(_SPACE) for piece in pieces) or any(
            token.get("lstrip") or token.get("rstrip") or token.get("single_word") or " " in token["content"]
            for token in spec.get("added_tokens") or []):
        return None
    writes_spaces = dummy_prefix = False
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    steps = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    for step in steps:
        if step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE:
            writes_spaces = True
        elif step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
            dummy_prefix = True
        else:
            return None
    pre = spec.get("pre_tokenizer")
    if pre is not None:
        if pre.get("type") != "Metaspace" or pre.get("replacement") != _SPACE:
            return None
        writes_spaces = True
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        dummy_prefix = dummy_prefix or scheme != "never"
    if not writes_spaces:
        return None
    return "drop" if dummy_prefix else "keep"


def _load_sentencepiece(path: str, num_threads: int) -> Tokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as err:
        if Path(path).name in HF_TOKENIZER_FILES:  # a file of a Hugging Face folder, given alone
            raise DataError(f"{path}: a file of a Hugging Face tokenizer folder; pass the folder, "
                            f"{Path(path).parent}") from None
        raise DataError(f"{path}: not a usable sentencepiece model ({err}); pass a sentencepiece .model file or a "
                        "Hugging Face tokenizer folder") from None
    eos = _optional_id(processor.eos_id())
    if eos is None:
        raise DataError(f"{path}: the sentencepiece model has no EOS token (eos_id=-1); "
                        "LLaMA-style training needs one to separate documents")
    tok = Tokenizer(path, processor, vocab_size=processor.vocab_size(),
                    bos_id=_optional_id(processor.bos_id()), eos_id=eos,
                    pad_id=_optional_id(processor.pad_id()), kind="sentencepiece",
                    space_cut=_space_cut(processor))
    tok._num_threads = num_threads
    return tok


def _load_hf(path: str) -> Tokenizer:
    if not any((Path(path) / name).is_file() for name in HF_TOKENIZER_FILES):
        raise DataError(f"{path}: a folder without tokenizer files (expected one of {', '.join(HF_TOKENIZER_FILES)}, "
                        "as a Hugging Face model folder has); pass a Hugging Face model folder or a "
                        "sentencepiece .model file")
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
                     eos_id=int(backend.eos_token_id), pad_id=_optional_id(backend.pad_token_id), kind="hf",
                     space_cut=_hf_space_cut(backend))


def vocabulary_difference(recorded: dict, mine: dict) -> str | None:
    """How tokenizer record `mine` (Tokenizer.record's size and digest) differs from `recorded` (a
    checkpoint's or a dataset's), in a few words ("520 tokens", "520 tokens, another vocabulary");
    None for the same vocabulary (a record without a digest: the same size)."""
    if mine["vocab_size"] != recorded.get("vocab_size"):
        return f"{mine['vocab_size']:,} tokens"
    if mine.get("vocab_sha256") and recorded.get("vocab_sha256") and mine["vocab_sha256"] != recorded["vocab_sha256"]:
        return f"{mine['vocab_size']:,} tokens, another vocabulary"
    return None


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
