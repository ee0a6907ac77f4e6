"""The on-disk format of instruction data, written by `melama preprocess-sft`.

For `--output-prefix data/medqa`, the dataset prefix (what a blend lists) is `data/medqa_sft_document`:
- `data/medqa_sft_document.bin/.idx`: token ids, one document per conversation (uint16 or int32, as
  `melama preprocess`); readable by megatron-core's IndexedDataset like any pre-training pair;
- `data/medqa_sft_document_loss_mask.bin/.idx`: uint8, one per token, 1 where the token is trained
  (answers and the EOS after each), with the same document boundaries;
- `data/medqa_sft_document.sft.json`: the marker: format, template, tokenizer, sequence length and
  counts. A prefix with a marker is instruction data (`is_sft_prefix`); the trainer needs no switch.

Publishing order (each step atomic): old marker and old token index removed, mask pair, marker, token
pair. A run killed at any point leaves no token index beside a missing or stale marker, so no
instruction data can be mistaken for pre-training data or paired with another run's masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from melama_mcore.data.indexed_writer import INCOMPLETE, IndexedWriter, write_json_atomically
from melama_mcore.data.verify import verify_indexed_dataset
from melama_mcore.errors import ConfigError, DataError

FORMAT, VERSION = "melama-sft", 1
MASK_SUFFIX = "_loss_mask"
MARKER_SUFFIX = ".sft.json"


def sft_prefix(output_prefix: str) -> str:
    """The dataset prefix `melama preprocess-sft --output-prefix P` writes (Megatron-style naming)."""
    return f"{output_prefix}_sft_document"


def mask_prefix(prefix: str) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def marker_path(prefix: str) -> str:
    return f"{prefix}{MARKER_SUFFIX}"


def _strip(prefix) -> str:
    prefix = os.fspath(prefix)
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def output_files(prefix: str) -> list[str]:
    """Every file preprocess-sft publishes for a dataset prefix."""
    return [prefix + ".bin", prefix + ".idx", mask_prefix(prefix) + ".bin", mask_prefix(prefix) + ".idx",
            marker_path(prefix)]


def is_sft_prefix(prefix) -> bool:
    """Whether a dataset prefix holds instruction data (written by `melama preprocess-sft`)."""
    return os.path.isfile(marker_path(_strip(prefix)))


def is_sft_blend(blend) -> bool:
    """True when every prefix of the blend is instruction data, False when none is; a mix is refused."""
    prefixes = [p for source in blend.sources for p in source.train + (source.valid or [])]
    kinds = {p: is_sft_prefix(p) for p in prefixes}
    if len(set(kinds.values())) > 1:
        sft = sorted(p for p, k in kinds.items() if k)
        other = sorted(p for p, k in kinds.items() if not k)
        raise ConfigError(f"the blend mixes instruction data (from preprocess-sft: {', '.join(sft)}) with "
                          f"pre-training data ({', '.join(other)}); train them in separate runs")
    return bool(prefixes) and all(kinds.values())


class SFTWriter:
    """Appends conversations (token ids + loss mask) to the two pairs; `commit` publishes them."""

    def __init__(self, prefix: str, token_dtype):
        self.prefix = prefix
        self._publishing = False
        self.tokens = IndexedWriter(prefix, token_dtype)
        self.masks = None
        try:
            self.masks = IndexedWriter(mask_prefix(prefix), np.uint8)
        except BaseException:
            self.tokens.abort()
            raise

    def add(self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.add_documents(tokens, lengths)
        self.masks.add_documents(masks, lengths)

    def commit(self, metadata: dict) -> None:
        self._publishing = True
        for stale in (marker_path(self.prefix), self.prefix + ".idx"):
            if os.path.exists(stale):
                os.remove(stale)
        self.masks.commit()
        write_json_atomically(marker_path(self.prefix), metadata)
        self.tokens.commit()

    def abort(self) -> None:
        """Remove this run's files, including what a failed commit had already published."""
        self.tokens.abort()
        if self.masks is not None:
            self.masks.abort()
        leftovers = [marker_path(self.prefix) + INCOMPLETE]
        if self._publishing:
            masks = mask_prefix(self.prefix)
            leftovers += [marker_path(self.prefix), masks + ".idx", masks + ".bin"]
        for path in leftovers:
            if os.path.exists(path):
                os.remove(path)


def read_marker(prefix) -> dict:
    path = marker_path(_strip(prefix))
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not written by melama preprocess-sft)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a melama-sft marker")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r}, this melama reads {VERSION}; "
                        "run preprocess-sft again")
    return meta


def verify_sft_prefix(prefix, vocab_size: int | None = None) -> dict:
    """Check both pairs and the marker agree; returns the marker. DataError naming the mismatch."""
    prefix = _strip(prefix)
    meta = read_marker(prefix)
    tokens = verify_indexed_dataset(prefix, vocab_size)
    masks = verify_indexed_dataset(mask_prefix(prefix))
    if np.dtype(masks.dtype) != np.uint8:
        raise DataError(f"{mask_prefix(prefix)}.idx: loss masks must be uint8, found {masks.dtype}")
    counts = meta.get("counts", {})
    if (tokens.sequences, tokens.tokens) != (counts.get("samples"), counts.get("tokens")) or \
            (masks.sequences, masks.tokens) != (tokens.sequences, tokens.tokens):
        raise DataError(f"{prefix}: the token pair ({tokens.sequences:,} samples, {tokens.tokens:,} tokens), "
                        f"the loss-mask pair ({masks.sequences:,}, {masks.tokens:,}) and {marker_path(prefix)} "
                        f"({counts.get('samples')}, {counts.get('tokens')}) disagree: files of different runs")
    return meta


class SFTIndexedData:
    """A verified instruction dataset: per conversation its token ids and loss mask (megatron-core's
    IndexedDataset reads both pairs)."""

    def __init__(self, prefix, vocab_size: int | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = _strip(prefix)
        self.meta = verify_sft_prefix(self.prefix, vocab_size)
        if self.meta["counts"]["samples"] == 0:  # checked before megatron's reader, which cannot map an empty file
            raise DataError(f"{self.prefix}: an empty instruction dataset (0 samples: preprocess-sft found no usable "
                            "conversation in its input); remove it from the blend")
        self.token_data = IndexedDataset(self.prefix)
        self.mask_data = IndexedDataset(mask_prefix(self.prefix))
        self.lengths = np.asarray(self.token_data.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self.mask_data.sequence_lengths):
            raise DataError(f"{self.prefix}: token and loss-mask pairs have different sample boundaries")
        if len(self.lengths) and self.lengths.min() < 2:  # preprocess-sft writes BOS .. answer EOS at least
            raise DataError(f"{self.prefix}: a sample of {int(self.lengths.min())} token: not preprocess-sft output")
        # What identifies these files in cached packing plans.
        self.identity = {"counts": self.meta["counts"], "template": self.meta.get("template"),
                         "tokenizer": self.meta.get("tokenizer")}

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.token_data[i], self.mask_data[i]
