"""Training and validation datasets for a blend, built by megatron-core.

megatron-core does the work (GPTDataset sample packing and shuffling, BlendedDataset weighting,
index caching, rank-0-first building); this module only turns a Blend into its configs:
- train: one BlendedDataset over every train prefix. A source's weight is split over its prefixes
  in proportion to their token counts, so a source made of several files behaves as one.
- valid: one dataset per source name, from its `valid` prefixes or, without them, from the valid
  part of `split` of its train prefixes.

megatron's builder assumes well-formed input. `check_pretraining_data` refuses up front, with what to
change, every input found to make it hang or fail deep inside (each reproduced on megatron-core 0.16.1):
- a dataset part with no tokens: GPTDataset counts epochs with `while tokens < requested: tokens +=
  tokens_per_epoch`, an endless loop at 100% CPU (an empty .bin, or a split part that rounds to no
  document: 10 documents under the default 98,2,0 have no valid part). Parts that are not used are
  not built at all (see `_build`), so that a small source does not hang on a valid part nobody asked for;
- a part with fewer tokens than one sample (seq_length + 1): the epoch count becomes samples x
  seq_length / tokens (6e10 for a 2-token source on the 70B run), a loop of hours, then megatron's
  int32 epoch argument overflows;
- split strings megatron's parser misreads ("-1,2" -> 1,2; "1e3" -> 1,3; "abc" -> NaN; 4 numbers ->
  AssertionError), and splits that leave training, or asked-for validation, without data;
- a cache folder that cannot be written (megatron fails on rank 0 while the other ranks wait in a
  barrier), and a cached index cut short by a killed run (megatron's loader fails on it, every run).
Every rank reaches the same verdict from the same files, so no rank is left waiting for another.
"""

from __future__ import annotations

from functools import partial

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from melama_mcore.data.blend import Blend, BlendSource, load_blend
from melama_mcore.data.sft.indexed import MASK_SUFFIX, is_sft_prefix
from melama_mcore.data.tokenizer import Tokenizer
from melama_mcore.data.verify import prefix_hint, range_tokens, verify_indexed_dataset
from melama_mcore.errors import ConfigError, DataError
from melama_mcore.output_paths import check_output_dir

_SPLIT = re.compile(r"\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}")
_MAX_BLENDED_DATASETS = 32766  # BlendedDataset keeps dataset ids as int16


def _not_single_dataset_note(record: logging.LogRecord) -> bool:
    """megatron warns "Building a BlendedDataset for a single MegatronDataset" whenever a blend has
    one train prefix: build_blended always gives weights (so a one-prefix blend draws its samples as
    any blend does), and the note asks nothing of the user."""
    return "BlendedDataset for a single MegatronDataset" not in record.getMessage()


class _MegatronTokenizerView:
    """The few attributes megatron's GPT datasets read from a tokenizer (vocab size, eod, pad)."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eos_id
        self.eos = tokenizer.eos_id
        self._pad = tokenizer.pad_id
        # Part of megatron's dataset description, whose hash names the cached sample indices.
        self.unique_identifiers = {"class": "melama_mcore.Tokenizer", "vocab_size": self.vocab_size,
                                   "eod": self.eod, "pad": self._pad}

    @property
    def pad(self) -> int:
        # LLaMA-2 has no pad token. Raising makes megatron fall back to its own out-of-vocabulary pad
        # id, so no real token (e.g. <unk>=0) is ever mistaken for padding and masked out.
        if self._pad is None:
            raise AttributeError("no pad token")
        return self._pad


@dataclass
class DataCheck:
    """What check_pretraining_data learnt: tokens per prefix, whole and in its train part."""

    tokens: dict[str, int]
    train_tokens: dict[str, int]


def _split_matrix(split, valid_samples: int) -> list:
    """megatron's split matrix for `split`, refusing what its parser misreads or what leaves no data."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    example = "train,valid,test shares such as 98,2,0"
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise ConfigError(f"split {split!r}: expected one to three non-negative numbers separated by commas, "
                          f"the {example}")
    shares = [float(share) for share in split.split(",")] + [0.0] * (2 - split.count(","))
    if shares[0] == 0:
        raise ConfigError(f"split {split!r} gives training no data: the first number is the train share ({example})")
    if valid_samples > 0 and shares[1] == 0:
        raise ConfigError(f"split {split!r} has no valid part, but validation asks for {valid_samples:,} samples: "
                          "give it a valid share (e.g. 98,2,0), give every blend source `valid` prefixes, or set "
                          "logging.eval_iters=0")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _verified(source: BlendSource, prefix: str, vocab_size: int | None):
    if prefix.endswith(MASK_SUFFIX) and is_sft_prefix(prefix[:-len(MASK_SUFFIX)]):
        raise DataError(f"blend source {source.name!r}: {prefix} is the loss mask of the instruction data "
                        f"{prefix[:-len(MASK_SUFFIX)]}, not tokens; list {prefix[:-len(MASK_SUFFIX)]} instead")
    if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
        raise DataError(f"blend source {source.name!r}: {prefix}.bin / .idx not found (a relative prefix is "
                        f"relative to the working directory, {os.getcwd()}{prefix_hint(prefix)})")
    return verify_indexed_dataset(prefix, vocab_size)


def _check_part(source: BlendSource, prefix: str, sequences: int, part: str, bookends, split,
                seq_length: int) -> int:
    """Tokens of the `part` of `prefix` megatron would read (the whole prefix when bookends is None);
    DataError when that part cannot hold one sample."""
    if bookends is None:
        begin, end, where = 0, sequences, f"{prefix}"
    else:
        # megatron's rule (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)
        begin, end = (int(round(b * float(sequences))) for b in bookends)
        where = f"the {part} part of {prefix} under split {split!r} (documents {begin:,} to {end:,} of {sequences:,})"
    if sequences == 0:
        raise DataError(f"blend source {source.name!r}: {prefix} is an empty dataset (0 documents: "
                        "`melama preprocess` found no text in its input); remove it from the blend")
    tokens = range_tokens(prefix, begin, end)
    if tokens < seq_length + 1:
        if part == "valid":
            fix = ("give every blend source `valid` prefixes, raise the valid share of the split, "
                   "or set logging.eval_iters=0")
        elif bookends is not None:
            fix = "add documents, raise the train share of the split, or lower training.seq_length"
        else:
            fix = "add documents, lower training.seq_length, or remove the source"
        holds = "no document" if begin == end else f"{tokens:,} tokens"
        raise DataError(f"blend source {source.name!r}: {where} holds {holds}, fewer than one sample of "
                        f"training.seq_length + 1 = {seq_length + 1:,} tokens (megatron would repeat it "
                        f"without end); {fix}")
    return tokens


def _check_cache_dir(cache_dir: str) -> None:
    """megatron writes its sample indices here (rank 0) and loads them on every later start."""
    path = Path(cache_dir)
    check_output_dir(path, "data.cache_dir")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Another rank may be writing its indices right now: the files are checked at start-up,
        # before process groups exist (the trainer's call), when no rank can be building.
        return
    for cached in sorted(path.glob("*.npy")):
        if not _complete_npy(cached):
            raise DataError(f"{cached}: an incomplete cached dataset index (a run stopped while writing it); "
                            "delete it and megatron rebuilds it")


def _complete_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            data_offset = f.tell()
    except (ValueError, OSError, EOFError):
        return False
    return path.stat().st_size == data_offset + math.prod(shape) * dtype.itemsize


def check_pretraining_data(blend, *, vocab_size: int | None, seq_length: int, train_samples: int,
                           valid_samples: int, split: str = "98,2,0", cache_dir: str | None = None) -> DataCheck:
    """Refuse, before any dataset is built, every input that would make megatron's builder hang or fail
    deep inside (see the module docstring); ConfigError / DataError say what to change.

    Verifies every prefix's .bin/.idx (against `vocab_size` when given). Takes the arguments of
    build_pretraining_datasets, which calls it again; the trainer calls it at start-up, before process
    groups exist: only that call can check megatron's cached index files (afterwards a rank may be
    writing them).
    """
    blend = load_blend(blend)
    for name, value, least in (("training.seq_length", seq_length, 1), ("train samples", train_samples, 1),
                               ("validation samples", valid_samples, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer of at least {least} (got {value!r})")
    explicit_valid = blend.sources[0].valid is not None
    matrix = None if explicit_valid else _split_matrix(split, valid_samples)
    train_prefixes = [prefix for source in blend.sources for prefix in source.train]
    if len(train_prefixes) > _MAX_BLENDED_DATASETS:
        raise ConfigError(f"the blend lists {len(train_prefixes):,} train prefixes; megatron blends at most "
                          f"{_MAX_BLENDED_DATASETS:,}: merge files with `melama preprocess` (several inputs, one output)")

    summaries = {}
    for source in blend.sources:
        for prefix in source.train + (source.valid or []):
            if prefix not in summaries:
                summaries[prefix] = _verified(source, prefix, vocab_size)
    train_tokens = {}
    for source in blend.sources:
        for prefix in source.train:
            train_tokens[prefix] = _check_part(source, prefix, summaries[prefix].sequences, "train",
                                               None if matrix is None else matrix[0], split, seq_length)
        if valid_samples > 0:
            for prefix in source.valid or source.train:
                _check_part(source, prefix, summaries[prefix].sequences, "valid",
                            None if matrix is None else matrix[1], split, seq_length)
    if cache_dir is not None:
        _check_cache_dir(cache_dir)
    return DataCheck({prefix: summary.tokens for prefix, summary in summaries.items()}, train_tokens)


def _weighted_prefixes(blend: Blend, tokens: dict[str, int], field: str) -> tuple[list[str], list[float]]:
    prefixes, weights = [], []
    for source, share in zip(blend.sources, blend.normalized_weights()):
        source_prefixes = getattr(source, field)
        total = sum(tokens[p] for p in source_prefixes)
        for prefix in source_prefixes:
            prefixes.append(prefix)
            weights.append(share * tokens[prefix] / total)
    return prefixes, weights


def _source_blend(prefixes: list[str], tokens: dict[str, int]):
    """(prefixes, weights) for megatron: weights by token count; None for a single prefix."""
    if len(prefixes) == 1:
        return prefixes, None
    return prefixes, [float(tokens[p]) for p in prefixes]


def build_pretraining_datasets(blend: Blend, *, tokenizer: Tokenizer, seq_length: int, seed: int,
                               train_samples: int, valid_samples: int, split: str = "98,2,0",
                               cache_dir: str | None = None, data_parallel_size: int = 1
                               ) -> tuple[torch.utils.data.Dataset, dict[str, torch.utils.data.Dataset]]:
    """(train dataset of `train_samples` samples, {source name: valid dataset of `valid_samples`})."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = load_blend(blend)
    tokens = check_pretraining_data(blend, vocab_size=tokenizer.vocab_size, seq_length=seq_length,
                                    train_samples=train_samples, valid_samples=valid_samples, split=split,
                                    cache_dir=cache_dir).tokens
    view = _MegatronTokenizerView(tokenizer)
    config = partial(GPTDatasetConfig, random_seed=seed, sequence_length=seq_length, tokenizer=view,
                     path_to_cache=cache_dir, reset_position_ids=False, reset_attention_mask=False,
                     eod_mask_loss=False, create_attention_mask=False, data_parallel_size=data_parallel_size)
    return build_blended(GPTDataset, config, blend, tokens, train_samples=train_samples,
                         valid_samples=valid_samples, split=split)


def build_blended(dataset_class, config, blend: Blend, tokens: dict[str, int], *, train_samples: int,
                  valid_samples: int, split: str):
    """megatron's blended builder over a blend: (one train dataset over every train prefix,
    {source name: a valid dataset of `valid_samples`, from its valid prefixes or its split's valid
    part}). `config(**blend_fields)` makes the dataset class's config; `tokens` weighs prefixes.
    For pre-training (GPTDataset) and packed instruction data (data/sft) alike."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_not_single_dataset_note)  # once

    def build(sizes, **data):
        cfg = config(**data)
        if cfg.split_matrix is not None:
            # megatron builds every split with a share, asked for or not (a 0-sample part with no
            # document loops forever); keep only the parts this build asks samples of.
            cfg.split_matrix = [bookends if size else None for bookends, size in zip(cfg.split_matrix, sizes)]
        # Every rank builds (rank 0 first, then the others, reading rank 0's cache when there is one):
        # each data-parallel rank needs the dataset to draw its own micro-batches.
        return BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, cfg).build()

    explicit_valid = blend.sources[0].valid is not None
    train_blend = _weighted_prefixes(blend, tokens, "train")
    if explicit_valid:
        train = build([train_samples, 0, 0], blend_per_split=[train_blend, None, None])[0]
    else:
        train = build([train_samples, 0, 0], blend=train_blend, split=split)[0]
    if train is None:
        raise DataError(f"split {split!r} leaves no training data: give it a train share")

    valid = {}
    if valid_samples > 0:
        for source in blend.sources:
            if explicit_valid:
                dataset = build([0, valid_samples, 0],
                                blend_per_split=[None, _source_blend(source.valid, tokens), None])[1]
            else:
                dataset = build([0, valid_samples, 0], blend=_source_blend(source.train, tokens),
                                split=split)[1]
            if dataset is not None:
                # megatron builds whole epochs of a single prefix: keep exactly the samples asked for.
                valid[source.name] = torch.utils.data.Subset(dataset, range(min(valid_samples, len(dataset))))
    return train, valid
