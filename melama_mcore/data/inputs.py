"""Streaming readers for corpus files: JSONL or plain text, optionally gzip/zstd compressed.

Reading is split in two so the expensive half runs in worker processes:
- `iter_raw_records` (main process) yields each record's raw bytes with its file and line number,
  never holding more than one record (bounded by `max_bytes`) in memory;
- `parse_record` (workers) decodes UTF-8 and JSON and extracts the text keys.
Error reasons name the problem and position only, never the document text (it may be patient data).
A compressed file that ends early or does not decode stops the reading with a DataError of its own
(never a bad record to skip: every record after the damage would be lost silently).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

from melama_mcore.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
INSTRUCTION_KEYS = ("conversations", "messages", "instruction")  # what preprocess-sft reads
_CHUNK = 1 << 20
_JSON_NOUNS = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}
_COMPRESSED_CHUNK = 1 << 16  # bounds the output of one decompress call


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


def check_input_file(path: str) -> None:
    """DataError unless `path` is a readable file (a directory is named as one, not as missing)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a directory; pass the files in it (e.g. {os.path.join(path, '*.jsonl.zst')})")
    if not p.is_file():
        raise DataError(f"{path}: input file not found")


def expand_inputs(patterns: list[str], flag: str = "--input") -> list[str]:
    """Paths and glob patterns -> files, in the order given (each pattern's matches sorted). A file
    reached twice (listed twice, matched by two patterns, or a link to another input) is refused:
    its records would be written twice."""
    files, seen = [], {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"{flag} {pattern!r} matches no file")
        for path in matches:
            check_input_file(path)
            stat = os.stat(path)
            first = seen.get((stat.st_dev, stat.st_ino))
            if first is not None:
                same = "is listed twice" if first == path else f"and {first} are the same file"
                raise DataError(f"{flag}: {path} {same}: its records would be read twice; list each file "
                                "once (to weigh a source more, raise its weight in the blend)")
            seen[(stat.st_dev, stat.st_ino)] = path
            files.append(path)
    return files


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a .gz/.zst file, as a raw stream.

    A stream that ends before its end marker, or does not decode, raises DataError naming the file:
    a damaged file loses every record after the damage, so it is never one bad record to skip.
    """

    def __init__(self, path: str, kind: str, chunks: Iterator[bytes], file):
        super().__init__()
        self._path, self._kind, self._chunks, self._file = path, kind, chunks, file
        self._pending = memoryview(b"")
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._next_chunk()
            if not chunk:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._delivered += n
        return n

    def _next_chunk(self) -> bytes:
        try:
            return next(self._chunks, b"")
        except EOFError:
            raise DataError(f"{self._path}: truncated compressed stream ({self._kind} data ends before its "
                            f"end marker, after {self._delivered:,} decompressed bytes): the file is incomplete; "
                            "copy or download it again (--on-error skip does not apply: the records after the "
                            "cut are lost)") from None
        except (gzip.BadGzipFile, zlib.error, zstandard.ZstdError):
            # The library's text is not repeated: gzip's quotes the file's first bytes.
            raise DataError(f"{self._path}: corrupt compressed stream ({self._kind} data does not decode, after "
                            f"{self._delivered:,} decompressed bytes): copy or download it again "
                            "(--on-error skip does not apply)") from None

    def close(self) -> None:
        if not self.closed:
            self._chunks.close()
            self._file.close()
        super().close()


def _gzip_chunks(file) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=file) as stream:  # raises EOFError when the last member is cut short
        while chunk := stream.read1(_CHUNK):
            yield chunk


def _zstd_chunks(file) -> Iterator[bytes]:
    """Decompressed chunks of every frame; EOFError when the file ends inside a frame (python-zstandard's
    stream_reader returns a silent end of file there)."""
    decompressor, frame = zstandard.ZstdDecompressor(), None
    while data := file.read(_COMPRESSED_CHUNK):
        while data:
            if frame is None or frame.eof:
                frame = decompressor.decompressobj()
            if out := frame.decompress(data):
                yield out
            data = frame.unused_data if frame.eof else b""
    if frame is not None and not frame.eof:
        raise EOFError


def open_binary(path: str):
    """Open a file for streaming, decompressing .gz / .zst transparently (see _Decompressed)."""
    check_input_file(path)
    suffix = Path(path).suffix.lower()
    if suffix not in COMPRESSED_SUFFIXES:
        return open(path, "rb", buffering=_CHUNK)
    kind = "gzip" if suffix == ".gz" else "zstd"
    if os.path.getsize(path) == 0:  # compressing nothing still writes a header: 0 bytes is a cut copy
        raise DataError(f"{path}: truncated compressed stream (an empty file, not even a {kind} header): "
                        "copy or download it again")
    file = open(path, "rb")
    chunks = _gzip_chunks(file) if kind == "gzip" else _zstd_chunks(file)
    return io.BufferedReader(_Decompressed(path, kind, chunks, file), buffer_size=_CHUNK)


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


def json_noun(value) -> str:
    """A parsed JSON value's kind in JSON's words ("number", "object", "null"), not Python's ("int",
    "dict", "NoneType"): for messages."""
    return _JSON_NOUNS.get(type(value), type(value).__name__)


def json_type(value) -> str:
    """json_noun with its article: "a number", "an object", "null"."""
    noun = json_noun(value)
    return noun if noun == "null" else f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


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
        return None, f"a JSON {json_noun(obj)}, expected an object"
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
            if any(k in obj for k in INSTRUCTION_KEYS):
                return None, f"missing key {key!r} (an instruction record: use melama preprocess-sft)"
            return None, f"missing key {key!r}"
        value = obj[key]
        if not isinstance(value, str):
            return None, f"key {key!r} is {json_type(value)}, expected a string"
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
