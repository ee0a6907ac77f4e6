"""`melama train-tokenizer`: train a sentencepiece model with LLaMA-2's settings.

LLaMA-2's tokenizer is a sentencepiece BPE model with byte fallback (no unknown characters),
digits split into single tokens, no text normalisation, <unk>=0, <s>=1, </s>=2 and no pad token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from melama_mcore.data.inputs import expand_inputs, iter_documents
from melama_mcore.errors import DataError, UserError
from melama_mcore.output_paths import check_output_prefix, remove_created_folders

LLAMA_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    character_coverage=0.99995,
    max_sentence_length=16384,
)


def train_sentencepiece(inputs: list[str], model_prefix: str, *, vocab_size: int = 32000,
                        json_keys=("text",), input_sentence_size: int = 2_000_000, seed: int = 0,
                        num_threads: int | None = None, overwrite: bool = False) -> Path:
    """Train `{model_prefix}.model` (and `.vocab`) from JSONL/text inputs; returns the model path.

    Documents are streamed once into a temporary one-sentence-per-line file (sentencepiece's input
    format); sentencepiece samples `input_sentence_size` lines from it. UserError before any work when
    the model cannot be written there, or exists and not `overwrite` (data tokenised with a replaced
    tokenizer would no longer match it).
    """
    import sentencepiece as spm

    inputs = expand_inputs(list(inputs))
    prefix = Path(model_prefix)
    created = check_output_prefix(model_prefix, "--model-prefix", [f"{prefix}.model", f"{prefix}.vocab"],
                                  overwrite=overwrite)
    try:
        with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".spm-train-") as tmp:
            lines_path = Path(tmp) / "lines.txt"
            count = 0
            with open(lines_path, "w", encoding="utf-8") as out:
                for doc in iter_documents(inputs, json_keys=list(json_keys), on_error="stop"):
                    for line in doc.texts[0].splitlines():
                        if line.strip():
                            out.write(line + "\n")
                            count += 1
            if count == 0:
                raise DataError(f"no text found in {', '.join(inputs)} to train a tokenizer on")
            tmp_prefix = Path(tmp) / "model"
            spm.set_random_generator_seed(seed)  # sentencepiece samples and shuffles input lines
            try:
                spm.SentencePieceTrainer.train(
                    input=str(lines_path), model_prefix=str(tmp_prefix), vocab_size=vocab_size,
                    input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                    num_threads=num_threads or os.cpu_count() or 1,
                    minloglevel=2, **LLAMA_TRAINER_SETTINGS)
            except RuntimeError as err:
                raise DataError(_training_failure(str(err), vocab_size)) from None
            # Move into place only when both files exist, so a failed run leaves no model behind.
            for ext in (".vocab", ".model"):
                os.replace(f"{tmp_prefix}{ext}", f"{prefix}{ext}")
    except BaseException:
        remove_created_folders(created)
        raise
    return Path(f"{prefix}.model")


def _training_failure(message: str, vocab_size: int) -> str:
    """sentencepiece's refusal in melama's terms: its text names its own flags (--character_coverage),
    which `melama train-tokenizer` does not have."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return (f"--vocab-size {vocab_size} is too small for this corpus: its distinct characters, the 256 "
                f"byte-fallback pieces and <unk> <s> </s> need {int(too_small.group(1)):,}; use --vocab-size "
                f"{too_small.group(1)} or more (LLaMA-2: 32000)")
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        return (f"--vocab-size {vocab_size} is more than this corpus can fill: sentencepiece finds at most "
                f"{int(too_large.group(1)):,} pieces in it; use --vocab-size {too_large.group(1)} or less, or "
                "train on more text")
    return f"sentencepiece could not train a {vocab_size}-token model ({message.splitlines()[-1]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama train-tokenizer",
        description="Train a LLaMA-2-style sentencepiece tokenizer (BPE, byte fallback, split digits, "
                    "identity normalisation, <unk>=0 <s>=1 </s>=2) on JSONL or text files.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL or text files (.gz/.zst accepted), as for `melama preprocess`")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000, help="default: 32000 (LLaMA-2)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON keys whose text is used (default: text)")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="lines sampled for training (default: 2,000,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.model (data tokenised with it will no longer match)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size < 260:
        raise UserError("--vocab-size must be at least 260 (256 byte-fallback pieces + specials)")
    model = train_sentencepiece(args.input, args.model_prefix, vocab_size=args.vocab_size,
                                json_keys=args.json_keys, input_sentence_size=args.input_sentence_size,
                                seed=args.seed, num_threads=args.threads, overwrite=args.overwrite)
    print(json.dumps({"model": str(model), "vocab_size": args.vocab_size}))
    return 0
