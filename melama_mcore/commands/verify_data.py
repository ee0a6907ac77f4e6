"""`melama verify-data`: check megatron-core .bin/.idx pairs before training on them.

    melama verify-data data/pubmed_text_document --tokenizer-model checkpoints/llama-2-70b-hf/tokenizer.model

The checks are data/verify.py's (index, offsets, sizes, token range), data/sft/indexed.py's for
instruction data (its loss-mask pair and marker) and data/provenance.py's (the tokenizer the data
records).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from melama_mcore.data.provenance import check_prefixes_tokenizer
from melama_mcore.data.sft.indexed import is_sft_prefix, verify_sft_prefix
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.data.verify import verify_indexed_dataset
from melama_mcore.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama verify-data",
        description="Check megatron-core .bin/.idx pairs: index header and size, lengths and offsets, "
                    ".bin size against the index, and the token range (a sample of the .bin by default; "
                    "all of it with --full). Prints one JSON line per pair. Exit status 2 with the file and "
                    "the mismatch when unusable, or when a pair holds no document (nothing to train on).")
    parser.add_argument("prefix", nargs="+", help="dataset prefix(es), PREFIX for PREFIX.bin / PREFIX.idx")
    parser.add_argument("--vocab-size", type=int, default=None, help="fail if a token id is >= this")
    parser.add_argument("--tokenizer-model", default=None,
                        help="the tokenizer to train with: fail if the data records another vocabulary, or a token id "
                             "is outside it (implies its --vocab-size)")
    parser.add_argument("--full", action="store_true", help="scan every token (reads the whole .bin)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tok = load_tokenizer(args.tokenizer_model) if args.tokenizer_model else None
    vocab_size = tok.vocab_size if tok is not None else args.vocab_size
    for prefix in args.prefix:
        summary = verify_indexed_dataset(prefix, vocab_size, full=args.full)
        instruction = is_sft_prefix(summary.prefix)
        if instruction:  # its loss-mask pair and marker too
            verify_sft_prefix(summary.prefix, vocab_size)
        if tok is not None:
            check_prefixes_tokenizer([summary.prefix], tok, tokenizer_key="--tokenizer-model", override=None)
        if summary.documents == 0:
            writer = "`melama preprocess-sft` found no usable conversation" if instruction else \
                "`melama preprocess` found no text"
            raise DataError(f"{summary.prefix}: empty dataset (0 documents, 0 tokens): nothing to train on; "
                            f"{writer} in its input")
        print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
