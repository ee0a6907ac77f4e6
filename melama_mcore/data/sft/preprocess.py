"""`melama preprocess-sft`: instruction JSONL -> token ids + per-token loss mask (see indexed.py).

The same machinery as `melama preprocess` (streamed inputs, worker processes, bounded memory, atomic
outputs, FILE:LINE errors without document text, progress and a summary); per record: parse the
conversation, apply the chat template, tokenise the rendered text, mark the answers, then drop or
truncate what does not fit the training sequence.

A conversation of n tokens gives n - 1 training positions (inputs are tokens[:-1], labels tokens[1:],
as in pre-training, where a sequence of --seq-length positions reads --seq-length + 1 tokens); it fits
when n - 1 <= --seq-length.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from melama_mcore.data.indexed_writer import token_dtype
from melama_mcore.data.inputs import DEFAULT_MAX_DOCUMENT_BYTES, expand_inputs, parse_json_object
from melama_mcore.data.preprocess import (Batch, check_token_ids, handle_bad_records, read_batches, run_failure,
                                          run_pipeline, show_progress)
from melama_mcore.data.sft.conversations import RecordError, conversation_from_record
from melama_mcore.data.sft.indexed import FORMAT, VERSION, SFTWriter, output_files, sft_prefix
from melama_mcore.data.sft.templates import CHOICES, load_template, travelling
from melama_mcore.data.sft.tokenize import refuse_special_text, special_text_pattern, tokenize_rendered
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import DataError, UserError
from melama_mcore.output_paths import check_output_prefix, remove_created_folders

DEFAULT_SEQ_LENGTH = 4096
TRUNCATION = ("drop", "truncate")


@dataclass
class SFTOptions:
    tokenizer_path: str
    chat_template: str
    seq_length: int
    truncation: str
    train_on_all: bool
    system_prompt: str | None


@dataclass
class EncodedSFTBatch:
    file: str
    records: int
    errors: list[tuple[int, str]]  # (line, reason)
    empty: int
    tokens: np.ndarray  # samples' token ids concatenated
    masks: np.ndarray  # their loss masks (uint8), aligned with tokens
    lengths: np.ndarray  # tokens per sample
    max_id: int
    truncated: int = 0
    too_long: int = 0  # dropped: longer than the sequence (--truncation drop)
    no_answer: int = 0  # dropped: no trained token within the sequence


@dataclass
class SFTSummary:
    prefix: str
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    empty: int = 0
    truncated: int = 0
    too_long: int = 0
    no_answer: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("prefix", "seconds")}

    def lines(self) -> list[str]:
        rate = f" ({self.samples / self.seconds:,.0f}/s)" if self.seconds > 0 and self.samples else ""
        trained = f"{self.trained_tokens / self.tokens:.1%}" if self.tokens else "-"
        skipped = f"skipped:   {self.skipped:,}"
        if self.skipped:
            skipped += " (" + ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped_by_reason.items())) + ")"
        warning = [] if self.samples else ["warning:   no sample was written; training on this prefix will be refused"]
        return warning + [f"samples:   {self.samples:,} written{rate}",
                f"tokens:    {self.tokens:,} ({self.trained_tokens:,} trained: {trained})",
                f"truncated: {self.truncated:,} (cut to the sequence length)",
                f"dropped:   {self.too_long + self.no_answer:,} ({self.too_long:,} longer than the sequence, "
                f"{self.no_answer:,} with no answer token within it)",
                f"empty:     {self.empty:,} (blank lines)",
                skipped,
                f"time:      {self.seconds:.1f} s",
                f"output:    {self.prefix} (.bin/.idx token ids, _loss_mask.bin/.idx, .sft.json); "
                "list this prefix in a blend"]


# ----- worker side -----
_WORKER = {}


def _init_worker(options: SFTOptions) -> None:
    tok = load_tokenizer(options.tokenizer_path, num_threads=1)
    _WORKER.update(tok=tok, options=options,
                   template=load_template(options.chat_template, tok, options.system_prompt),
                   specials=special_text_pattern(tok.special_texts))


def _fit(ids: np.ndarray, mask: np.ndarray, opt: SFTOptions, result: EncodedSFTBatch):
    """The sample as written, or None when dropped (counted in `result`)."""
    if opt.train_on_all:
        mask = np.ones_like(mask)
    if len(ids) - 1 > opt.seq_length:
        if opt.truncation == "drop":
            result.too_long += 1
            return None
        ids, mask = ids[:opt.seq_length + 1], mask[:opt.seq_length + 1]
        result.truncated += 1
    if not mask[1:].any():  # the first token is never a label
        result.no_answer += 1
        return None
    return ids, mask


def encode_batch(batch: Batch) -> EncodedSFTBatch:
    tok, opt, template = _WORKER["tok"], _WORKER["options"], _WORKER["template"]
    result = EncodedSFTBatch(batch.file, len(batch.records), [], 0, np.zeros(0, np.int64), np.zeros(0, np.uint8),
                             np.zeros(0, np.int32), -1)
    rendered = []
    for record in batch.records:
        obj, reason = (None, record.error) if record.data is None else parse_json_object(record.data)
        if reason is None and obj is None:
            result.empty += 1
            continue
        if reason is None:
            try:
                conv = conversation_from_record(obj)
                refuse_special_text(conv, _WORKER["specials"])
                rendered.append(template.render(conv))
                continue
            except RecordError as err:
                reason = str(err)
        result.errors.append((record.line, reason))
    samples = [s for s in (_fit(ids, mask, opt, result) for ids, mask in tokenize_rendered(tok, rendered)) if s]
    if samples:
        result.tokens = np.concatenate([ids for ids, _ in samples])
        result.masks = np.concatenate([mask for _, mask in samples])
        result.lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int32)
        result.max_id = int(result.tokens.max())
    return result


# ----- main side -----
def _write(result: EncodedSFTBatch, writer: SFTWriter, summary: SFTSummary, on_error: str, tok, bar, start):
    handle_bad_records(result.file, result.errors, summary, on_error)
    check_token_ids(result.max_id, tok, int(np.iinfo(writer.tokens.dtype).max), result.file)
    writer.add(result.tokens, result.masks, result.lengths)
    summary.samples += len(result.lengths)
    summary.tokens += int(result.tokens.size)
    summary.trained_tokens += _trained(result)
    summary.empty += result.empty
    summary.truncated += result.truncated
    summary.too_long += result.too_long
    summary.no_answer += result.no_answer
    show_progress(bar, result.records, summary.tokens, start)


def _trained(result: EncodedSFTBatch) -> int:
    """Trained labels: mask 1 anywhere but a sample's first token (never a label)."""
    firsts = np.cumsum(result.lengths) - result.lengths
    return int(result.masks.sum()) - int(result.masks[firsts].sum())


def preprocess_sft(inputs: list[str], output_prefix: str, tokenizer_path: str, *, chat_template: str = "me-llama",
                   workers: int | None = None, on_error: str = "stop", seq_length: int = DEFAULT_SEQ_LENGTH,
                   truncation: str = "drop", train_on_all: bool = False, system_prompt: str | None = None,
                   max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, progress: bool | None = None,
                   overwrite: bool = False) -> SFTSummary:
    """Tokenise instruction JSONL into `sft_prefix(output_prefix)` (see indexed.py); returns a summary.

    Raises UserError before any work when the outputs cannot be written there or exist already (unless
    `overwrite`); DataError (nothing left under a final name) on the first bad record when
    on_error="stop", on an unusable tokenizer or template, or on unreadable inputs.
    """
    if seq_length < 1:
        raise UserError("--seq-length must be at least 1")
    if truncation not in TRUNCATION:
        raise UserError(f"--truncation must be one of {', '.join(TRUNCATION)}")
    if max_document_bytes < 1:
        raise UserError("--max-document-bytes must be at least 1")
    files = expand_inputs(list(inputs))
    tok = load_tokenizer(tokenizer_path, num_threads=1)
    try:
        tok.encode_with_offsets(["offsets check"])
    except (NotImplementedError, ValueError, TypeError) as err:
        raise DataError(f"{tokenizer_path}: the tokenizer cannot report where its tokens come from in the text "
                        f"({type(err).__name__}), which the loss masks need; use a fast tokenizer "
                        "(tokenizer.json) or the sentencepiece .model") from None
    # a broken template stops here, before any worker starts
    template = load_template(chat_template, tok, system_prompt)
    workers = max(1, workers or os.cpu_count() or 1)
    options = SFTOptions(tokenizer_path, chat_template, seq_length, truncation, train_on_all, system_prompt)
    prefix = sft_prefix(output_prefix)
    created = check_output_prefix(output_prefix, "--output-prefix", output_files(prefix), overwrite=overwrite)
    summary = SFTSummary(prefix)
    writer = None
    start = time.perf_counter()
    try:
        writer = SFTWriter(prefix, token_dtype(tok.vocab_size))
        run_pipeline(read_batches(files, "jsonl", "file", max_document_bytes), encode_batch,
                     lambda result, bar: _write(result, writer, summary, on_error, tok, bar, start),
                     workers=workers, initializer=_init_worker, initargs=(options,), progress=progress,
                     unit="samples")
        summary.seconds = time.perf_counter() - start
        writer.commit({
            "format": FORMAT, "version": VERSION,
            "template": travelling(template),  # what the trainer keeps in the run's config (data.chat_template)
            "tokenizer": tok.record(),
            "seq_length": seq_length, "truncation": truncation, "train_on_all": train_on_all,
            "inputs": [str(f) for f in files],
            "counts": summary.counts(),
        })
    except BaseException as err:
        if writer is not None:
            writer.abort()
        remove_created_folders(created)
        if (failure := run_failure(err, output_prefix)) is not None:
            raise failure from None
        raise
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama preprocess-sft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenise instruction-tuning JSONL into megatron-core .bin/.idx pairs of token ids and a "
                    "per-token loss mask.",
        epilog="""\
input records (JSONL, optionally .gz/.zst; other keys are ignored):
  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt"|"agent", "value": ...}, ...]}  Me-LLaMA/ShareGPT
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  {"instruction": ..., "input": ... (optional), "output": ...}                                      Alpaca
  Turns alternate prompt, answer; a system prompt may come first; the last turn is an answer.

chat templates (--chat-template):
  me-llama     <s>Human: \\n{prompt}\\n\\nAssistant: \\n{answer}</s>Human: ... (Me-LLaMA; the default)
  llama2-chat  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt} [/INST] {answer} </s><s>[INST] ... (Meta's)
  hf           the chat_template of the Hugging Face tokenizer folder given as --tokenizer-model
  FILE.jinja   a Jinja chat template (messages, bos_token, eos_token), as transformers renders it

loss mask:
  1 on answer tokens and the EOS after each answer, 0 on prompts, system prompts and template text
  (--train-on-all: 1 everywhere). A conversation of n tokens gives n - 1 training positions and fits
  when n - 1 <= --seq-length; longer ones are dropped (--truncation drop, the default) or cut
  (--truncation truncate); both are counted in the summary, as are samples left with no answer token.

outputs (for --output-prefix data/medqa; list data/medqa_sft_document in a blend):
  data/medqa_sft_document.bin/.idx             token ids (uint16 below 65,500 tokens, else int32)
  data/medqa_sft_document_loss_mask.bin/.idx   loss mask, uint8, same sample boundaries
  data/medqa_sft_document.sft.json             marker: template (name, Jinja text, system prompt), tokenizer,
                                               sequence length, counts
  A blend of such prefixes trains as instruction tuning; nothing else needs switching. Training
  refuses them under another tokenizer (vocabulary) than the marker records. The output location is
  checked before any work; existing outputs are refused unless --overwrite; a file listed twice too.

bad records (malformed JSON, unknown formats or speakers, turns out of order, non-string text,
text containing a special token such as </s>, non-UTF-8 bytes, a line over --max-document-bytes):
  --on-error stop (default) stops at the first with FILE:LINE and the reason, exit status 2, no output;
  --on-error skip skips and counts them. Messages never include record text.""")
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns (.gz/.zst too)")
    parser.add_argument("--output-prefix", required=True, help="path prefix of the outputs (see below)")
    parser.add_argument("--tokenizer-model", required=True,
                        help="a sentencepiece .model file or a Hugging Face tokenizer folder")
    parser.add_argument("--chat-template", default="me-llama", metavar="|".join(CHOICES) + "|FILE.jinja",
                        help="how conversations are rendered (default: me-llama)")
    parser.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    parser.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                        help="what to do with a bad record (default: stop)")
    parser.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH,
                        help=f"training sequence length (default: {DEFAULT_SEQ_LENGTH}); the trainer's must not "
                             "be shorter")
    parser.add_argument("--truncation", choices=TRUNCATION, default="drop",
                        help="samples longer than the sequence: drop them (default) or keep their beginning")
    parser.add_argument("--train-on-all", action="store_true",
                        help="loss on every token (prompts too), not only on answers")
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt for records that have none (default: none); it travels with the "
                             "template into the model's exports, so evaluation prompts carry it too")
    parser.add_argument("--max-document-bytes", type=int, default=DEFAULT_MAX_DOCUMENT_BYTES,
                        help="larger records are bad records (default: 64 MiB); bounds memory")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    summary = preprocess_sft(args.input, args.output_prefix, args.tokenizer_model, chat_template=args.chat_template,
                             workers=args.workers, on_error=args.on_error, seq_length=args.seq_length,
                             truncation=args.truncation, train_on_all=args.train_on_all,
                             system_prompt=args.system_prompt, max_document_bytes=args.max_document_bytes,
                             progress=False if args.no_progress else None, overwrite=args.overwrite)
    print("\n".join(summary.lines()))
    return 0
