"""Data blends: named sources with weights (the Me-LLaMA 15:1:4 mix), and `melama blend-report`.

A blend file (YAML) is a list of sources, or a mapping with a `sources:` list:

    sources:
      - name: pubmed               # unique name; validation losses are reported per name
        weight: 15                 # relative; normalised over the sources
        train: data/pubmed_text_document          # a prefix or a list of prefixes
        valid: [data/pubmed_valid_text_document]  # optional

Paths rule: a relative prefix is relative to the working directory melama runs in, like every other
path melama takes (the config's `data.tokenizer` and `data.blend`, `--output-prefix`, `--input`): run
the workflow from one directory and the same string names the same file everywhere. The blend file's
own folder plays no part.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from melama_mcore.data.sft.indexed import is_sft_blend
from melama_mcore.data.sft.report import format_sft_report, sft_blend_report
from melama_mcore.errors import ConfigError

_SOURCE_KEYS = {"name", "weight", "train", "valid"}


@dataclass
class BlendSource:
    name: str
    weight: float
    train: list[str]
    valid: list[str] | None = None


@dataclass
class Blend:
    sources: list[BlendSource]

    def normalized_weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


def _prefixes(value, where: str, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
        raise ConfigError(f"{where}: `{field}` must be a dataset prefix or a non-empty list of prefixes")
    resolved = []
    for prefix in items:
        prefix = os.path.expanduser(prefix)
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]  # a common slip: the prefix is the path without the extension
        resolved.append(prefix)
    return resolved


def load_blend(spec) -> Blend:
    """A blend from a YAML file path, or from the already-parsed list/dict. ConfigError on bad input."""
    if isinstance(spec, Blend):
        return spec
    where = "blend"
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{path}: blend file not found")
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        where = str(path)
    if isinstance(spec, dict):
        if set(spec) != {"sources"}:
            raise ConfigError(f"{where}: expected a `sources:` list (got keys {sorted(spec)})")
        spec = spec["sources"]
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: a blend is a non-empty list of sources")
    sources = []
    for i, item in enumerate(spec):
        at = f"{where}: source {i + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a mapping with name, weight, train[, valid]")
        unknown = set(item) - _SOURCE_KEYS
        missing = {"name", "weight", "train"} - set(item)
        if unknown or missing:
            raise ConfigError(f"{at}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else []) +
                ([f"missing keys {sorted(missing)}"] if missing else [])))
        name, weight = item["name"], item["weight"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}: `name` must be a non-empty string")
        at = f"{where}: source {name!r}"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ConfigError(f"{at}: `weight` must be a positive finite number (got {weight!r})")
        valid = item.get("valid")
        sources.append(BlendSource(name, float(weight), _prefixes(item["train"], at, "train"),
                                   None if valid is None else _prefixes(valid, at, "valid")))
    duplicates = sorted(name for name, count in collections.Counter(s.name for s in sources).items() if count > 1)
    if duplicates:
        raise ConfigError(f"{where}: source names must be unique ({', '.join(duplicates)} repeated)")
    if not math.isfinite(sum(s.weight for s in sources)):
        raise ConfigError(f"{where}: the weights add up to more than a float holds; use relative weights "
                          "such as 15, 1, 4")
    if len({s.valid is None for s in sources}) > 1:
        raise ConfigError(f"{where}: give `valid` for every source or for none (without `valid`, "
                          "validation data is split off every source's train prefixes)")
    return Blend(sources)


def blend_report(blend: Blend, samples: int, seq_length: int, split: str = "98,2,0") -> list[dict]:
    """Per source: weight share, tokens drawn for `samples` samples of `seq_length`, tokens available
    to training (the train part of `split`, or whole prefixes when the blend names `valid` prefixes),
    and the epochs that implies (> 1: the source repeats). Refuses what training would refuse."""
    from melama_mcore.data.dataset import check_pretraining_data  # it builds on this module

    check = check_pretraining_data(blend, vocab_size=None, seq_length=seq_length, train_samples=samples,
                                   valid_samples=0, split=split)
    rows = []
    available = [sum(check.train_tokens[p] for p in s.train) for s in blend.sources]
    total_available = sum(available)
    for source, share, tokens in zip(blend.sources, blend.normalized_weights(), available):
        drawn = share * samples * seq_length
        rows.append(dict(name=source.name, weight=source.weight, share=share,
                         natural_share=tokens / total_available, tokens_drawn=int(round(drawn)),
                         tokens_available=tokens, epochs=drawn / tokens))
    return rows


def format_report(rows: list[dict], samples: int, seq_length: int) -> str:
    lines = [f"{samples:,} samples x {seq_length:,} tokens = {samples * seq_length:,} training tokens",
             f"{'source':<16} {'weight':>7} {'share':>7} {'on disk':>8} {'tokens drawn':>16} "
             f"{'tokens available':>17} {'epochs':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['weight']:>7g} {r['share']:>7.1%} {r['natural_share']:>8.1%} "
                     f"{r['tokens_drawn']:>16,} {r['tokens_available']:>17,} {r['epochs']:>8.2f}")
    repeating = [r["name"] for r in rows if r["epochs"] > 1]
    if repeating:
        lines.append(f"repeats (more than one epoch): {', '.join(repeating)}")
    return "\n".join(lines)


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
    if is_sft_blend(blend):  # instruction data: samples are packed conversations
        print(format_sft_report(sft_blend_report(blend, args.samples, args.seq_length), args.samples, args.seq_length))
    else:
        print(format_report(blend_report(blend, args.samples, args.seq_length, args.split),
                            args.samples, args.seq_length))
    return 0
