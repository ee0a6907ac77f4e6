"""`melama preprocess`: tokenise JSONL / text corpora into megatron-core `.bin`/`.idx` pairs.

Pipeline: the main process streams raw records (bytes + line numbers) from the inputs in batches;
worker processes decode, parse and batch-tokenise them; the main process writes the results in
input order. At most a few batches per worker are in flight, so memory does not grow with the
input; a long document is encoded in pieces (Tokenizer.iter_encode), so memory follows the piece,
not the document. Outputs are written under `*.incomplete` names and renamed only after the whole
run succeeded (see indexed_writer). Workers die with the main process, even when it is killed with
SIGKILL (no orphan keeps a core busy).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import itertools
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from melama_mcore.data.indexed_writer import META_SUFFIX, IndexedWriter, token_dtype
from melama_mcore.data.inputs import (DEFAULT_MAX_DOCUMENT_BYTES, detect_format, expand_inputs, iter_raw_records,
                                      parse_record)
from melama_mcore.data.provenance import pretraining_meta
from melama_mcore.data.tokenizer import LONG_TEXT_CHARS, load_tokenizer
from melama_mcore.errors import DataError, UserError
from melama_mcore.output_paths import check_output_prefix, remove_created_folders

BATCH_RECORDS = 512
BATCH_BYTES = 1 << 20
MIN_TIMED_SECONDS = 0.05  # shorter runs print no rate: it would be mostly start-up noise
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DTYPES = {"uint16": np.uint16, "int32": np.int32}


@dataclass
class EncodeOptions:
    tokenizer_path: str
    json_keys: list[str]
    prepend_bos: bool
    append_eod: bool
    dtype: type  # of the output tokens


@dataclass
class Batch:
    file: str
    fmt: str
    records: list  # RawRecord


@dataclass
class EncodedBatch:
    file: str
    records: int
    errors: list[tuple[int, str]]  # (line, reason)
    empty: int
    tokens: list[np.ndarray]  # per key: documents' tokens concatenated
    lengths: list[np.ndarray]  # per key: tokens per document
    max_id: int


@dataclass
class Summary:
    outputs: list[str]
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"documents: {self.documents:,} written{self._rate(self.documents)}",
               f"tokens:    {self.tokens:,}{self._rate(self.tokens)}",
               f"empty:     {self.empty:,} (documents with no text, not written)",
               f"skipped:   {self.skipped:,}" + (" (" + ", ".join(
                   f"{n:,} {reason}" for reason, n in sorted(self.skipped_by_reason.items())) + ")"
                   if self.skipped else ""),
               f"time:      {self.seconds:.1f} s"]
        out += [f"output:    {p}.bin / .idx" for p in self.outputs]
        if self.documents == 0:
            out.append("warning:   the dataset is empty (no document had text): training cannot use it")
        return out

    def _rate(self, count: int) -> str:
        """' (N/s)', with three significant digits below 100/s; nothing when there is nothing to rate
        or the run was too short to time."""
        if count == 0 or self.seconds < MIN_TIMED_SECONDS:
            return ""
        rate = count / self.seconds
        return f" ({rate:,.0f}/s)" if rate >= 100 else f" ({rate:.3g}/s)"


# ----- worker side -----
_WORKER = {}


def _init_worker(options: EncodeOptions) -> None:
    _WORKER["tok"] = load_tokenizer(options.tokenizer_path, num_threads=1)
    _WORKER["options"] = options


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker when the main process dies, however it dies.

    A forked worker holds the write end of its own task queue, so it never sees the queue close and
    would wait for work forever after a SIGKILL of the main process. (With spawn, on other systems,
    workers hold no such end: they read end-of-file and exit by themselves.)
    """
    if sys.platform == "linux":  # the signal comes when the forking thread ends: preprocess's caller
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the main process died before the signal was armed
        os._exit(1)


def _reason_kind(reason: str) -> str:
    """A short category for counting skips (the reason without positions or turn numbers)."""
    return re.sub(r"^turn \d+: ", "", reason.split(" (")[0])


def encode_batch(batch: Batch) -> EncodedBatch:
    tok, opt = _WORKER["tok"], _WORKER["options"]
    errors, texts_per_key = [], [[] for _ in opt.json_keys]
    for record in batch.records:
        texts, reason = (None, record.error) if record.data is None else \
            parse_record(record.data, batch.fmt, opt.json_keys)
        record.data = None  # parsed: a long document is not held twice
        if reason is not None:
            errors.append((record.line, reason))
            continue
        for k, text in enumerate(texts):
            texts_per_key[k].append(text)
    empty, tokens, lengths, max_id = 0, [], [], -1
    for texts in texts_per_key:
        flat, doc_lengths, key_max_id = _encode_documents(tok, [t for t in texts if t and not t.isspace()], opt)
        empty += len(texts) - len(doc_lengths)
        max_id = max(max_id, key_max_id)
        tokens.append(flat)
        lengths.append(doc_lengths)
    return EncodedBatch(batch.file, len(batch.records), errors, empty, tokens, lengths, max_id)


def _encode_documents(tok, texts: list[str], opt: EncodeOptions) -> tuple[np.ndarray, np.ndarray, int]:
    """(the tokens of the documents that have any, with BOS/EOD, concatenated in the output dtype;
    tokens per document; the largest id, -1 if none). Runs of ordinary texts are encoded in one call;
    a long text piece by piece, each piece cast to the output dtype as it comes, so its tokens are
    held once (2 bytes each for uint16 outputs), plus one piece in int32."""
    segments, lengths, max_id, run = [], [], -1, []

    def add(ids: np.ndarray) -> None:  # int32 ids; the largest is taken before the cast
        nonlocal max_id
        if ids.size:
            max_id = max(max_id, int(ids.max()))
        segments.append(ids.astype(opt.dtype, copy=False))

    def close_run() -> None:
        if run:
            flat, run_lengths = _with_special_tokens([ids for ids in tok.encode_batch(run) if ids], tok, opt)
            add(flat)
            lengths.append(run_lengths)
            run.clear()

    for text in texts:
        if len(text) <= LONG_TEXT_CHARS:
            run.append(text)
            continue
        close_run()
        count, first = 0, len(segments)
        if opt.prepend_bos:
            add(np.array([tok.bos_id], np.int32))
        for ids in tok.iter_encode(text):
            add(np.array(ids, dtype=np.int32))
            count += len(ids)
        if count == 0:  # no tokens: an empty document, not written
            del segments[first:]
            continue
        if opt.append_eod:
            add(np.array([tok.eos_id], np.int32))
        lengths.append(np.array([sum(segment.size for segment in segments[first:])], np.int32))
    close_run()
    flat = np.concatenate(segments) if segments else np.zeros(0, opt.dtype)
    return flat, np.concatenate(lengths) if lengths else np.zeros(0, np.int32), max_id


def _with_special_tokens(docs: list[list[int]], tok, opt: EncodeOptions) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents as int32, adding BOS/EOD, vectorised (per-token Python loops cost ~30% here)."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.array(list(itertools.chain.from_iterable(docs)), dtype=np.int32)
    ends = np.cumsum(lengths)
    positions, values = [], []
    if opt.append_eod:  # listed first: at a shared position, EOD of doc i precedes BOS of doc i+1
        positions.append(ends)
        values.append(np.full(len(docs), tok.eos_id, dtype=np.int32))
    if opt.prepend_bos:
        positions.append(ends - lengths)
        values.append(np.full(len(docs), tok.bos_id, dtype=np.int32))
    if positions:
        flat = np.insert(flat, np.concatenate(positions), np.concatenate(values))
    return flat, (lengths + len(positions)).astype(np.int32)


# ----- main side -----
def read_batches(inputs: list[str], fmt: str, text_unit: str, max_bytes: int):
    """Batches of raw records, file by file, bounded in records and bytes."""
    for path in inputs:
        file_format = detect_format(path, fmt)
        records, size = [], 0
        for record in iter_raw_records(path, file_format, text_unit, max_bytes):
            records.append(record)
            size += len(record.data or b"")
            if len(records) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield Batch(path, file_format, records)
                records, size = [], 0
        if records:
            yield Batch(path, file_format, records)


def output_prefix_for(prefix: str, key: str) -> str:
    """Megatron-LM's naming: one pair per JSON key, `{prefix}_{key}_document`."""
    return f"{prefix}_{key}_document"


def output_files(prefixes: list[str]) -> list[str]:
    """Every file a run publishes for these output prefixes."""
    return [prefix + suffix for prefix in prefixes for suffix in (".bin", ".idx", META_SUFFIX)]


def preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str, *, json_keys=("text",),
               workers: int | None = None, prepend_bos: bool = True, append_eod: bool = False,
               on_error: str = "stop", input_format: str = "auto", text_unit: str = "file",
               dtype: str = "auto", max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
               progress: bool | None = None, overwrite: bool = False) -> Summary:
    """Tokenise `inputs` into `{output_prefix}_{key}_document.{bin,idx}` per key (and its `.meta.json`,
    see data/provenance.py); returns a Summary.

    Raises UserError before any work when the outputs cannot be written there or exist already (unless
    `overwrite`); DataError (nothing left behind under a final name) on the first bad record when
    on_error="stop", on a tokenizer that does not fit the dtype, or on unreadable inputs.
    """
    json_keys = list(json_keys)
    if len(set(json_keys)) < len(json_keys):
        raise UserError(f"--json-keys {' '.join(json_keys)}: a key is listed twice (each key writes its own pair)")
    if max_document_bytes < 1:
        raise UserError("--max-document-bytes must be at least 1")
    files = expand_inputs(list(inputs))
    tok = load_tokenizer(tokenizer_path, num_threads=1)
    if prepend_bos and tok.bos_id is None:
        raise DataError(f"{tokenizer_path}: the tokenizer has no BOS token; pass --no-prepend-bos")
    out_dtype = token_dtype(tok.vocab_size) if dtype == "auto" else DTYPES[dtype]
    dtype_limit = int(np.iinfo(out_dtype).max)
    if tok.vocab_size - 1 > dtype_limit:
        raise DataError(f"{tokenizer_path}: vocabulary of {tok.vocab_size:,} tokens does not fit "
                        f"{np.dtype(out_dtype).name} (max id {dtype_limit:,}); use --dtype int32 or auto")
    workers = max(1, workers or os.cpu_count() or 1)
    options = EncodeOptions(tokenizer_path, json_keys, prepend_bos, append_eod, out_dtype)

    prefixes = [output_prefix_for(output_prefix, key) for key in json_keys]
    summary = Summary(outputs=prefixes)
    # before any work: a bad path fails first
    created = check_output_prefix(output_prefix, "--output-prefix", output_files(prefixes), overwrite=overwrite)
    writers = []
    start = time.perf_counter()
    try:
        for prefix in prefixes:
            writers.append(IndexedWriter(prefix, out_dtype))
        run_pipeline(read_batches(files, input_format, text_unit, max_document_bytes), encode_batch,
                     lambda result, bar: _write(result, writers, summary, on_error, dtype_limit, tok, bar, start),
                     workers=workers, initializer=_init_worker, initargs=(options,), progress=progress, unit="docs")
        # all pairs or none: every one is complete on disk before the first is renamed into place
        for key, writer in zip(json_keys, writers):
            writer.prepare(pretraining_meta(tok, json_key=key, prepend_bos=prepend_bos, append_eod=append_eod,
                                            inputs=files, documents=writer.documents, tokens=writer.tokens))
        for writer in writers:
            writer.publish()
    except BaseException as err:
        for writer in writers:
            writer.abort()
        remove_created_folders(created)
        if (failure := run_failure(err, output_prefix)) is not None:
            raise failure from None
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def run_failure(err: BaseException, output_prefix: str) -> DataError | None:
    """The one-line error of a run stopped by an OS error or a dead worker (None for any other
    exception: it is raised as it is), once its outputs are removed."""
    if isinstance(err, OSError):  # a disk full, an input that cannot be read, ...
        return DataError(f"{err.filename or output_prefix}: {err.strerror or err}; nothing was written")
    if isinstance(err, BrokenProcessPool):
        return DataError("a tokeniser worker process died (killed, e.g. by the kernel when out of memory: "
                         "lower --workers or --max-document-bytes); nothing was written")
    return None


def run_pipeline(batches, encode, consume, *, workers: int, initializer, initargs, progress: bool | None,
                 unit: str) -> None:
    """Run `encode(batch)` in `workers` processes and `consume(result, bar)` here, in input order.

    At most a few batches per worker are in flight, so memory does not grow with the input. On any
    failure, Ctrl-C or SIGTERM the workers are stopped and the exception propagates: the caller
    removes its partial outputs. `bar` is a progress bar (None without one), counting `unit`.
    """
    # fork: workers start in milliseconds and inherit nothing they write to.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
    bar = None
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # progress None: a bar only on a terminal (tqdm's disable=None); False: none.
        if progress is not False:
            bar = tqdm(unit=f" {unit}", unit_scale=True, dynamic_ncols=True, desc="tokenising",
                       disable=None if progress is None else False, mininterval=1.0)
        in_flight = collections.deque()
        for batch in batches:
            in_flight.append(pool.submit(encode, batch))
            if len(in_flight) >= 2 * workers + 2:
                consume(in_flight.popleft().result(), bar)
        while in_flight:
            consume(in_flight.popleft().result(), bar)
    except BaseException:
        signal.signal(signal.SIGTERM, previous_term)  # first: a second SIGTERM now ends the process as usual
        _stop_at_once(pool)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if bar is not None:
            bar.close()
    pool.shutdown()


def _stop_at_once(pool: ProcessPoolExecutor) -> None:
    """Kill the workers, whatever they are doing, and wait until the pool's threads have ended.

    A pool still winding down when the interpreter exits (shutdown with wait=False) races with
    concurrent.futures' exit hook, which writes to a pipe the pool's thread may be closing: 1 run in
    10-25 then ended in "Exception ignored in: <module 'threading'> ... Bad file descriptor". Killed
    workers make the pool's thread fail what is pending and end; joining it takes milliseconds.
    """
    for process in list((pool._processes or {}).values()):  # public only from Python 3.14 (terminate_workers)
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(parent_pid: int, initializer, initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited by fork
    _exit_with_parent(parent_pid)
    initializer(*initargs)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _write(result: EncodedBatch, writers, summary: Summary, on_error: str, dtype_limit: int, tok, bar, start):
    handle_bad_records(result.file, result.errors, summary, on_error)
    check_token_ids(result.max_id, tok, dtype_limit, result.file)
    for writer, tokens, lengths in zip(writers, result.tokens, result.lengths):
        writer.add_documents(tokens, lengths)
    summary.documents += sum(map(len, result.lengths))
    summary.tokens += sum(int(t.size) for t in result.tokens)
    summary.empty += result.empty
    show_progress(bar, result.records, summary.tokens, start)


def handle_bad_records(file: str, errors: list[tuple[int, str]], summary, on_error: str) -> None:
    """on_error="stop": DataError naming the first bad record's file:line; "skip": count them by kind
    in `summary.skipped` / `summary.skipped_by_reason`."""
    if not errors:
        return
    line, reason = errors[0]
    if on_error == "stop":
        raise DataError(f"{file}:{line}: {reason} (use --on-error skip to skip such records; "
                        "nothing was written)")
    summary.skipped += len(errors)
    for _, reason in errors:
        kind = _reason_kind(reason)
        summary.skipped_by_reason[kind] = summary.skipped_by_reason.get(kind, 0) + 1


def check_token_ids(max_id: int, tok, dtype_limit: int, file: str) -> None:
    """Never write an id outside the vocabulary or one the output dtype would wrap."""
    if max_id >= tok.vocab_size or max_id > dtype_limit:
        raise DataError(f"{tok.path}: the tokenizer produced id {max_id:,}, outside its vocabulary "
                        f"of {tok.vocab_size:,} or the output dtype (while reading {file})")


def show_progress(bar, records: int, tokens: int, start: float) -> None:
    if bar is not None:
        bar.update(records)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama preprocess",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenise JSONL or text corpora into megatron-core .bin/.idx pairs.",
        epilog="""\
outputs:
  One pair per JSON key, named as Megatron-LM's tools/preprocess_data.py names them:
  {output-prefix}_{key}_document.bin / .idx  (e.g. --output-prefix data/pubmed -> data/pubmed_text_document).
  Text inputs use the key name 'text'. Several inputs are written, in order, into the same pair (a
  file listed twice is refused). Beside each pair, {...}_document.meta.json records the tokenizer
  (its vocabulary's sha256), options, inputs and counts: training refuses data made with another
  tokenizer. A relative prefix is relative to the working directory; missing folders are created.
  Existing outputs are refused unless --overwrite. The output location is checked before any work.
  An input with no text writes an empty pair (the summary says so; training refuses it).

tokens per document:
  [BOS] + tokens + [EOS if --append-eod]. BOS is on by default (LLaMA-2 starts every sequence with <s>);
  --no-prepend-bos --append-eod gives exactly Megatron-LM's `--append-eod` output. Token dtype: uint16
  for vocabularies below 65,500, else int32 (Megatron-LM's rule). Empty documents are counted, not written.

bad records (malformed JSON, missing key, non-UTF-8 bytes, a document over --max-document-bytes):
  --on-error stop (default) stops at the first one with FILE:LINE and the reason, exit status 2, and
  leaves no output; --on-error skip skips and counts them. Messages never include document text.
  Output is written to *.incomplete files and renamed only when the whole run succeeded.
  A .gz/.zst input that ends early or does not decode is not a bad record: it stops the run
  ("truncated compressed stream" / "corrupt compressed stream"), with or without --on-error skip.

memory:
  A tokenizer needs ~50 (sentencepiece) to ~150 (Hugging Face) bytes per character of the text it
  encodes, and slows down on very long texts. With a sentencepiece .model or a Hugging Face folder
  built like LLaMA's (spaces as U+2581: its tokenizer.json), a document over 16 Ki characters is
  encoded in pieces cut at spaces, with the ids of the whole: memory is then ~8x the document (its
  text and tokens), not ~50-150x, at the usual speed (a run of over 16 Ki characters without a space
  is still encoded whole). Other Hugging Face tokenizers (byte-level BPE, WordPiece) encode each
  document whole: --max-document-bytes bounds memory at ~50-150x its value.""")
    parser.add_argument("--input", nargs="+", required=True,
                        help="input files or glob patterns: .jsonl/.json/.ndjson or text, optionally .gz/.zst")
    parser.add_argument("--output-prefix", required=True, help="path prefix of the outputs (see below)")
    parser.add_argument("--tokenizer-model", required=True,
                        help="a sentencepiece .model file or a Hugging Face tokenizer folder")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    parser.add_argument("--append-eod", action="store_true", help="append EOS (the EOD token) to every document")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=True,
                        help="start every document with BOS (default: on)")
    parser.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                        help="what to do with a bad record (default: stop)")
    parser.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                        help="auto: .jsonl/.json/.ndjson are JSONL, anything else text")
    parser.add_argument("--text-document", choices=["file", "block"], default="file",
                        help="text inputs: one document per file, or per blank-line-separated block")
    parser.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto",
                        help="token dtype in the .bin (default: from the vocabulary size)")
    parser.add_argument("--max-document-bytes", type=int, default=DEFAULT_MAX_DOCUMENT_BYTES,
                        help="larger documents are bad records (default: 64 MiB); see memory below")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    summary = preprocess(args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
                         workers=args.workers, prepend_bos=args.prepend_bos, append_eod=args.append_eod,
                         on_error=args.on_error, input_format=args.input_format,
                         text_unit=args.text_document, dtype=args.dtype,
                         max_document_bytes=args.max_document_bytes,
                         progress=False if args.no_progress else None, overwrite=args.overwrite)
    print("\n".join(summary.lines()))
    return 0
