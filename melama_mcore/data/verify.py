"""Check a `.bin`/`.idx` pair before training on it (`melama verify-data`: commands/verify_data.py, and the trainer at start-up).

Default checks read the index and only a sample of the `.bin` (its first and last MiB plus a few
spread in between), so they take milliseconds on terabyte files: header, index size, lengths,
offsets, document boundaries, `.bin` size against the index, and the token range of the sample.
`full=True` scans every token (vectorised, in chunks, memory flat).
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass

import numpy as np

from melama_mcore.data.indexed_writer import CODE_DTYPES, INDEX_HEADER, INDEX_VERSION, header_size
from melama_mcore.errors import DataError

_CHUNK_ITEMS = 1 << 22
_SAMPLE_BYTES = 1 << 20
_SAMPLES = 8


@dataclass
class DatasetSummary:
    prefix: str
    dtype: str
    sequences: int
    documents: int
    tokens: int
    bin_bytes: int
    max_token_checked: int | None  # the largest token id seen in the scanned part
    scanned: str  # "sample" or "full"


def _read_index(prefix: str):
    idx_path = prefix + ".idx"
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(header_size())
    if len(head) < header_size() or head[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise DataError(f"{idx_path}: not a megatron-core index (bad header)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", head, offset)
    (code,) = struct.unpack_from("<B", head, offset + 8)
    sequences, documents = struct.unpack_from("<QQ", head, offset + 9)
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
    if code not in CODE_DTYPES:
        raise DataError(f"{idx_path}: unknown token dtype code {code}")
    expected = header_size() + sequences * (4 + 8) + documents * 8
    if size not in (expected, expected + sequences):  # + sequences: optional per-sequence modes
        raise DataError(f"{idx_path}: {size:,} bytes, but its header ({sequences:,} sequences, "
                        f"{documents:,} documents) needs {expected:,}: truncated or corrupt index")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    base = header_size()
    lengths = mm[base:base + 4 * sequences].view(np.int32)
    pointers = mm[base + 4 * sequences:base + 12 * sequences].view(np.int64)
    doc_index = mm[base + 12 * sequences:base + 12 * sequences + 8 * documents].view(np.int64)
    return CODE_DTYPES[code], lengths, pointers, doc_index


def _check_offsets(idx_path: str, lengths, pointers, itemsize: int) -> int:
    """Pointers must be the running sum of lengths; returns the total token count."""
    total = 0
    for start in range(0, len(lengths), _CHUNK_ITEMS):
        chunk = np.asarray(lengths[start:start + _CHUNK_ITEMS], dtype=np.int64)
        if chunk.size and chunk.min() < 0:
            bad = start + int(np.argmax(chunk < 0))
            raise DataError(f"{idx_path}: sequence {bad:,} has a negative length")
        expected = (np.cumsum(chunk) - chunk + total) * itemsize
        mismatch = np.nonzero(np.asarray(pointers[start:start + _CHUNK_ITEMS]) != expected)[0]
        if mismatch.size:
            raise DataError(f"{idx_path}: byte offset of sequence {start + int(mismatch[0]):,} does not "
                            "follow from the lengths: corrupt index")
        total += int(chunk.sum())
    return total


def _check_documents(idx_path: str, doc_index, sequences: int) -> None:
    if len(doc_index) == 0 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise DataError(f"{idx_path}: document boundaries do not cover the {sequences:,} sequences")
    for start in range(0, len(doc_index), _CHUNK_ITEMS):
        chunk = np.asarray(doc_index[max(start - 1, 0):start + _CHUNK_ITEMS])
        if np.any(np.diff(chunk) < 0):
            raise DataError(f"{idx_path}: document boundaries are not in order: corrupt index")


def _scan_tokens(bin_path: str, dtype, full: bool) -> int:
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if os.path.getsize(bin_path) else np.zeros(0, dtype)
    n = len(tokens)
    if full:
        starts = range(0, n, _CHUNK_ITEMS)
        width = _CHUNK_ITEMS
    else:
        width = _SAMPLE_BYTES // np.dtype(dtype).itemsize
        starts = sorted({int(s) for s in np.linspace(0, max(n - width, 0), _SAMPLES)})
    largest = -1
    for start in starts:
        chunk = np.asarray(tokens[start:start + width])
        if chunk.size:
            largest = max(largest, int(chunk.max()))
            if chunk.min() < 0:
                raise DataError(f"{bin_path}: negative token id near token {start:,}: corrupt data")
    return largest


def verify_indexed_dataset(prefix: str, vocab_size: int | None = None, *, full: bool = False) -> DatasetSummary:
    """Check `{prefix}.bin`/`.idx`; DataError naming the file and the mismatch if they are unusable."""
    prefix = os.fspath(prefix)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: not found (a dataset is a PREFIX.bin / PREFIX.idx pair{prefix_hint(prefix)})")
    dtype, lengths, pointers, doc_index = _read_index(prefix)
    itemsize = np.dtype(dtype).itemsize
    if vocab_size is not None and vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(f"{idx_path}: tokens are {np.dtype(dtype).name}, which cannot hold a vocabulary of "
                        f"{vocab_size:,}: written with another tokenizer")
    tokens = _check_offsets(idx_path, lengths, pointers, itemsize)
    _check_documents(idx_path, doc_index, len(lengths))
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != tokens * itemsize:
        what = "truncated" if bin_bytes < tokens * itemsize else "longer than its index"
        raise DataError(f"{bin_path}: {bin_bytes:,} bytes but {idx_path} describes {tokens:,} "
                        f"{np.dtype(dtype).name} tokens ({tokens * itemsize:,} bytes): the .bin is {what}, "
                        "or the .idx belongs to another .bin")
    largest = _scan_tokens(bin_path, dtype, full)
    if vocab_size is not None and largest >= vocab_size:
        raise DataError(f"{bin_path}: token id {largest:,} is outside the vocabulary of {vocab_size:,}: "
                        "tokenised with another tokenizer")
    return DatasetSummary(prefix, np.dtype(dtype).name, len(lengths), len(doc_index) - 1, tokens, bin_bytes,
                          largest if largest >= 0 else None, "full" if full else "sample")


def prefix_hint(prefix: str) -> str:
    """'; did you mean ...' when `prefix` is a preprocess --output-prefix whose dataset prefixes exist
    (the commands append _{key}_document / _sft_document to it) or a folder holding datasets, else ''."""
    pattern = os.path.join(glob.escape(prefix), "*.idx") if os.path.isdir(prefix) else \
        glob.escape(prefix) + "_*_document.idx"
    found = sorted(path[:-4] for path in glob.glob(pattern) if not path.endswith("_loss_mask.idx"))
    if os.path.isdir(prefix):
        return f"; {prefix} is a folder" + (f" holding {', '.join(found[:3])}" if found else "")
    return (f"; did you mean {' or '.join(found[:3])}? preprocess adds _KEY_document to its --output-prefix"
            if found else "")


def range_tokens(prefix: str, begin: int, end: int) -> int:
    """Tokens in sequences [begin, end) of a verified pair: megatron splits a dataset by sequence."""
    _, lengths, _, _ = _read_index(os.fspath(prefix))
    return sum(int(np.sum(lengths[start:min(start + _CHUNK_ITEMS, end)], dtype=np.int64))
               for start in range(begin, end, _CHUNK_ITEMS))
