"""Training and validation datasets for a blend, built by megatron-core.

megatron-core does the work (GPTDataset sample packing and shuffling, BlendedDataset weighting,
index caching, rank-0-first building); this module only turns a Blend into its configs:
- train: one BlendedDataset over every train prefix. A source's weight is split over its prefixes
  in proportion to their token counts, so a source made of several files behaves as one.
- valid: one dataset per source name, from its `valid` prefixes or, without them, from the valid
  part of `split` of its train prefixes.
"""

from __future__ import annotations

import torch

from melama_mcore.data.blend import Blend, load_blend
from melama_mcore.data.tokenizer import Tokenizer
from melama_mcore.data.verify import verify_indexed_dataset
from melama_mcore.errors import DataError


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


def _weighted_prefixes(blend: Blend, tokens: dict[str, int], field: str) -> tuple[list[str], list[float]]:
    prefixes, weights = [], []
    for source, share in zip(blend.sources, blend.normalized_weights()):
        source_prefixes = getattr(source, field)
        total = sum(tokens[p] for p in source_prefixes)
        if total == 0:
            raise DataError(f"blend source {source.name!r}: its {field} prefixes hold no tokens")
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
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = load_blend(blend)
    tokens = {}
    for source in blend.sources:
        for prefix in source.train + (source.valid or []):
            if prefix not in tokens:
                tokens[prefix] = verify_indexed_dataset(prefix, tokenizer.vocab_size).tokens
    view = _MegatronTokenizerView(tokenizer)

    def build(sizes, **data):
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, tokenizer=view, path_to_cache=cache_dir,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, data_parallel_size=data_parallel_size, **data)
        # Every rank builds (rank 0 first, then the others, reading rank 0's cache when there is one):
        # each data-parallel rank needs the dataset to draw its own micro-batches.
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    explicit_valid = blend.sources[0].valid is not None
    train_blend = _weighted_prefixes(blend, tokens, "train")
    if explicit_valid:
        train = build([train_samples, 0, 0], blend_per_split=[train_blend, None, None])[0]
    else:
        train = build([train_samples, 0, 0], blend=train_blend, split=split)[0]
    if train is None:
        raise DataError(f"split {split!r} leaves no training data")

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
