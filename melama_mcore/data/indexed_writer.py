"""Streaming writer for megatron-core's `.bin`/`.idx` format (the `MMIDIDX` index, version 1).

Byte-compatible with `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` when each
document is one sequence (what Megatron-LM's preprocessor writes without --split-sentences), but
with memory flat in the corpus size: megatron's builder keeps every sequence length in a Python
list until `finalize`; here they are spilled to a side file and the index is written in chunks.

`commit(meta)` also writes `{prefix}.meta.json`, what `melama preprocess` records about how the pair was
made (data/provenance.py); Megatron-LM's readers ignore it.

Atomicity: everything is written to `*.incomplete` names (`prepare`); `publish` removes any old
`.idx` and `.meta.json` first, then publishes the new `.meta.json`, renames `.bin` and finally `.idx`
(`commit` does both). A run killed at any point therefore leaves no pair that looks valid (no
`.idx`, or an `.idx` next to exactly the `.bin` it describes and its own `.meta.json`, or none).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron-core's DType codes (indexed_dataset.DType)
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_CHUNK_ITEMS = 1 << 20
INCOMPLETE = ".incomplete"
META_SUFFIX = ".meta.json"


def token_dtype(vocab_size: int):
    """The dtype Megatron-LM's preprocessor picks (DType.optimal_dtype): uint16 below 65,500."""
    return np.uint16 if vocab_size < 65500 else np.int32


def header_size() -> int:
    return len(INDEX_HEADER) + 8 + 1 + 8 + 8


class IndexedWriter:
    """Append documents (a token array each) to `{prefix}.bin` and write `{prefix}.idx` on commit."""

    def __init__(self, prefix: str, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.bin_tmp = self.prefix + ".bin" + INCOMPLETE
        self.idx_tmp = self.prefix + ".idx" + INCOMPLETE
        self.lengths_tmp = self.prefix + ".lengths" + INCOMPLETE
        self._bin = open(self.bin_tmp, "wb")
        self._lengths = open(self.lengths_tmp, "wb")
        self.documents = 0
        self.tokens = 0
        self._meta = None  # prepare's record, published with the pair

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """`tokens`: the documents' tokens concatenated; `lengths`: tokens per document."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def commit(self, meta: dict | None = None) -> None:
        """Publish the pair, and `meta` as `{prefix}.meta.json` when given."""
        self.prepare(meta)
        self.publish()

    def prepare(self, meta: dict | None = None) -> None:
        """Everything of commit but the renames: the index written, both files synced, `meta` written
        under its `.incomplete` name. Several pairs that appear together (one per JSON key) are all
        prepared before any is published: a failure then leaves none (abort removes these files)."""
        self._bin.close()
        self._lengths.close()
        self._write_index()
        os.remove(self.lengths_tmp)
        for path in (self.bin_tmp, self.idx_tmp):
            _fsync(path)
        self._meta = meta
        if meta is not None:
            _write_json_synced(self.prefix + META_SUFFIX + INCOMPLETE, meta)

    def publish(self) -> None:
        """The renames that make a prepared pair exist (the old `.idx` and record removed first)."""
        final_bin, final_idx, final_meta = self.prefix + ".bin", self.prefix + ".idx", self.prefix + META_SUFFIX
        for stale in (final_idx, final_meta):  # never leave an old .idx or record beside a new .bin
            if os.path.exists(stale):
                os.remove(stale)
        if self._meta is not None:
            os.replace(final_meta + INCOMPLETE, final_meta)
        os.replace(self.bin_tmp, final_bin)
        os.replace(self.idx_tmp, final_idx)

    def abort(self) -> None:
        for handle in (self._bin, self._lengths):
            handle.close()
        for path in (self.bin_tmp, self.idx_tmp, self.lengths_tmp, self.prefix + META_SUFFIX + INCOMPLETE):
            if os.path.exists(path):
                os.remove(path)

    def _write_index(self) -> None:
        n = self.documents
        itemsize = np.dtype(self.dtype).itemsize
        with open(self.idx_tmp, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n))  # sequences: one per document
            idx.write(struct.pack("<Q", n + 1))  # document index entries: 0..n
            lengths = np.memmap(self.lengths_tmp, dtype=np.int32, mode="r") if n else np.zeros(0, np.int32)
            for start in range(0, n, _CHUNK_ITEMS):
                idx.write(np.asarray(lengths[start:start + _CHUNK_ITEMS]).tobytes())
            offset = 0  # byte offset of each sequence in the .bin
            for start in range(0, n, _CHUNK_ITEMS):
                chunk = np.asarray(lengths[start:start + _CHUNK_ITEMS], dtype=np.int64) * itemsize
                pointers = np.cumsum(chunk) - chunk + offset
                offset += int(chunk.sum())
                idx.write(pointers.astype(np.int64).tobytes())
            for start in range(0, n + 1, _CHUNK_ITEMS):
                idx.write(np.arange(start, min(start + _CHUNK_ITEMS, n + 1), dtype=np.int64).tobytes())
            del lengths


def write_json_atomically(path: str, obj) -> None:
    """`obj` as JSON at `path`, written under an `.incomplete` name, synced, then renamed."""
    _write_json_synced(path + INCOMPLETE, obj)
    os.replace(path + INCOMPLETE, path)


def _write_json_synced(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
