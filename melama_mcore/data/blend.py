"""Data blends: named sources with weights (the Me-LLaMA 15:1:4 mix). `melama blend-report` (commands/)
prints what a blend implies.

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

import collections
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

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
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a blend file: give the blend's YAML file (data.blend; "
                              "see examples/configs/)")
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
