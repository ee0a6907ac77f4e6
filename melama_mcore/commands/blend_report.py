"""`melama blend-report`: what a blend implies for a training length, per source (shares, epochs).

    melama blend-report examples/blends/me_llama_15_1_4.yaml --samples 31494000 --seq-length 4096

Pre-training blends: data/report.py; instruction data (preprocess-sft prefixes): data/sft/report.py.
"""

from __future__ import annotations

import argparse
import sys

from melama_mcore.data.blend import load_blend
from melama_mcore.data.report import blend_report, format_report
from melama_mcore.data.run_data import INSTRUCTIONS, data_kind
from melama_mcore.data.sft.report import format_sft_report, sft_blend_report
from melama_mcore.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama blend-report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For a blend file and a training length, print per source its share of the training\n"
                    "tokens, its share of the tokens on disk, and how many epochs of it the run implies\n"
                    "(above 1 the source repeats). Token counts come from the .idx files. Data that\n"
                    "training would refuse (a missing or empty dataset, a split part that cannot hold\n"
                    "one sample) is refused here too, with what to change. For instruction data\n"
                    "(prefixes written by preprocess-sft): per source its samples, the packed sequences\n"
                    "one epoch takes, and the epochs drawn.",
        epilog="""\
paths:
  A relative prefix in a blend file is relative to the working directory you run melama in, not to
  the blend file's folder: the rule for every path melama takes (--output-prefix, --input, the
  training config's data.tokenizer and data.blend). So from the repository root,
    melama preprocess --input pubmed/*.jsonl.zst --output-prefix data/pubmed ...
  writes data/pubmed_text_document.{bin,idx}, which examples/blends/me_llama_15_1_4.yaml names as
  data/pubmed_text_document. Run blend-report and training from that same directory.""")
    parser.add_argument("blend", help="blend YAML file (see examples/blends/me_llama_15_1_4.yaml)")
    parser.add_argument("--samples", type=int, required=True,
                        help="training samples (global batch x steps; packed sequences for instruction data)")
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    parser.add_argument("--split", default="98,2,0",
                        help="train,valid,test shares of each source without `valid` prefixes, as the "
                             "training config's data.split (default: 98,2,0); tokens available are the train part's")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples <= 0 or args.seq_length <= 0:
        raise ConfigError("--samples and --seq-length must be positive")
    blend = load_blend(args.blend)
    if data_kind(blend) is INSTRUCTIONS:  # samples are packed conversations
        print(format_sft_report(sft_blend_report(blend, args.samples, args.seq_length), args.samples, args.seq_length))
    else:
        print(format_report(blend_report(blend, args.samples, args.seq_length, args.split),
                            args.samples, args.seq_length))
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
