"""`melama report`: one report across runs, checkpoints and evaluations, with pictures.

    melama report --out report/ outputs/me-llama-13b ppl/base ppl/me-llama eval/base eval/chat --baseline base

Each INPUT is a training run folder (its metrics.jsonl: loss, validation loss per source, learning
rate, tokens/s and MFU against tokens seen; a resumed run is one curve), a `melama eval-ppl` output
(perplexity.json, or a folder of them, one per checkpoint) or a `melama eval` output (results.json).
Writes DIR/report.html (self-contained: opens offline), DIR/report.md, DIR/report.json (every number,
unrounded) and the PNGs. Perplexities are set side by side only when scored with the same tokenizer
and seq_length, scores only under the same protocol; others are shown apart, with the reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from melama_mcore.report.build import REPORT_HTML, REPORT_MD, make_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melama report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="a run folder, an eval-ppl output or a melama eval output (any mix; a file inside one "
                             "names it too)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for report.html, report.md, report.json and the PNGs (created if needed)")
    parser.add_argument("--label", action="append", default=[], metavar="LABEL",
                        help="name of an input: the i-th --label names the i-th INPUT, the others keep their folder's "
                             "name; an eval-ppl and a melama eval output of one model may share a label")
    parser.add_argument("--baseline", metavar="LABEL",
                        help="the model the others are compared with: perplexity change in percent, score "
                             "difference (default: the first eval-ppl or melama eval input)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = make_report(args.inputs, args.out, labels=args.label, baseline=args.baseline)
    pictures = len(report.data["figures"])
    print(f"wrote {report.folder / REPORT_HTML} and {report.folder / REPORT_MD} "
          f"({pictures} picture{'s' if pictures != 1 else ''})")
    if report.pictures_missing:
        print(f"no pictures: {report.pictures_missing}")
    return 0
