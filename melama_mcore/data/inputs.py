"""Streaming readers for corpus files: JSONL or plain text, optionally gzip/zstd compressed.

Reading is split in two so the expensive half runs in worker processes:
- `iter_raw_records` (main process) yields each record's raw bytes with its file and line number,
  never holding more than one record (bounded by `max_bytes`) in memory;
- `parse_record` (workers) decodes UTF-8 and JSON and extracts the text keys.
Error reasons name the problem and position only, never the document text (it may be patient data).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from melama_mcore.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass
class RawRecord:
    """One document's raw bytes; `data` is None when the reader already found it unusable."""

    line: int
    data: bytes | None
    error: str | None = None


@dataclass
class Document:
    file: str
    line: int
    texts: list[str]  # one text per requested key


def open_binary(path: str):
    """Open a file for streaming, decompressing .gz / .zst transparently."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: input file not found")
    suffix = p.suffix.lower()
    if suffix == ".gz":
        return gzip.open(p, "rb")
    if suffix in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True),
                                 buffer_size=_CHUNK)
    return open(p, "rb", buffering=_CHUNK)


def detect_format(path: str, override: str = "auto") -> str:
    """'jsonl' for .jsonl/.json/.ndjson (also under .gz/.zst), else 'text'; `override` wins."""
    if override != "auto":
        return override
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in COMPRESSED_SUFFIXES:
        suffix = Path(p.stem).suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "text"


def _too_big(max_bytes: int) -> str:
    return f"document larger than --max-document-bytes ({max_bytes:,} bytes)"


def _read_lines(stream, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; bytes is None for a line over max_bytes (skipped unread)."""
    number = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # discard the rest without holding it
                line = stream.readline(_CHUNK)
            yield number, None
        else:
            yield number, line


def iter_raw_records(path: str, fmt: str, text_unit: str, max_bytes: int) -> Iterator[RawRecord]:
    """Records of one file. jsonl: one per line. text: the whole file ('file') or one per
    blank-line-separated block ('block'); a record's line is where it starts."""
    with open_binary(path) as stream:
        if fmt == "jsonl":
            for number, line in _read_lines(stream, max_bytes):
                yield RawRecord(number, line, None if line is not None else _too_big(max_bytes))
        elif text_unit == "file":
            data = stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                yield RawRecord(1, None, _too_big(max_bytes))
            else:
                yield RawRecord(1, data)
        else:
            yield from _iter_blocks(stream, max_bytes)


def _iter_blocks(stream, max_bytes: int) -> Iterator[RawRecord]:
    def finished(start, parts, oversized):
        return RawRecord(start, None, _too_big(max_bytes)) if oversized else RawRecord(start, b"".join(parts))

    parts, size, start, oversized = [], 0, None, False
    for number, line in _read_lines(stream, max_bytes):
        if line is not None and not line.strip():  # a blank line ends the block
            if start is not None:
                yield finished(start, parts, oversized)
            parts, size, start, oversized = [], 0, None, False
            continue
        if start is None:
            start = number
        if oversized:
            continue
        if line is None or size + len(line) > max_bytes:
            oversized, parts = True, []  # drop what was kept: memory stays bounded
        else:
            parts.append(line)
            size += len(line)
    if start is not None:
        yield finished(start, parts, oversized)


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 (byte {err.start} of the record)"


def parse_json_object(data: bytes) -> tuple[dict | None, str | None]:
    """One JSONL record: (object, None); (None, None) for a blank line; or (None, reason).
    The reason never quotes the document."""
    text, reason = _decode(data)
    if text is None or not text.strip():
        return None, reason
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return None, f"a JSON {type(obj).__name__}, expected an object"
    return obj, None


def parse_record(data: bytes, fmt: str, json_keys: list[str]) -> tuple[list[str] | None, str | None]:
    """(texts, None) or (None, reason). The reason never quotes the document."""
    if fmt != "jsonl":
        text, reason = _decode(data)
        return (None, reason) if text is None else ([text.rstrip("\n")], None)
    obj, reason = parse_json_object(data)
    if reason is not None:
        return None, reason
    if obj is None:
        return [""] * len(json_keys), None  # a blank line: an empty document
    texts = []
    for key in json_keys:
        if key not in obj:
            return None, f"missing key {key!r}"
        value = obj[key]
        if not isinstance(value, str):
            return None, f"key {key!r} is a {type(value).__name__}, expected a string"
        texts.append(value)
    return texts, None


def iter_documents(paths: list[str], *, json_keys: list[str], on_error: str = "stop", fmt: str = "auto",
                   text_unit: str = "file", max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[Document]:
    """Parsed documents of several files, in order, in this process (for small jobs)."""
    for path in paths:
        file_format = detect_format(path, fmt)
        for record in iter_raw_records(path, file_format, text_unit, max_bytes):
            texts, reason = (None, record.error) if record.data is None else \
                parse_record(record.data, file_format, json_keys)
            if reason is not None:
                if on_error == "stop":
                    raise DataError(f"{path}:{record.line}: {reason}")
                continue
            yield Document(path, record.line, texts)
