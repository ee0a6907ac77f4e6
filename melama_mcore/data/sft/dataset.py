"""Packed instruction-tuning datasets for a blend, on megatron-core's dataset machinery.

Each blend prefix written by preprocess-sft becomes a `PackedSFTDataset`, a megatron `MegatronDataset`:
megatron's `BlendedMegatronDatasetBuilder` splits its conversations into train/valid/test (`split`, by
contiguous ranges, as for pre-training) and builds it rank 0 first, and megatron's `BlendedDataset`
draws sequences from the sources by weight. A source's weight is its share of the training
*sequences* (as in pre-training, where a sample is a sequence); `melama blend-report` prints the
epochs of each source this implies.

A sample (one packed sequence of `seq_length` positions) holds whole conversations, each as its own
segment: position ids restart at 0, attention stays inside the segment (`cu_seqlens`), and the
remainder is one padding segment with no loss. Fields, all fixed-size so micro-batches collate:
  tokens, labels      int64 [s]  inputs and next-token labels (padding: the pad id, or EOS)
  loss_mask           float32 [s] 1 on trained labels (answers and their EOS)
  position_ids        int64 [s]  0.. within each conversation and within the padding
  cu_seqlens          int32 [s + 1] segment boundaries 0, .., s (padding segment included), then -1
  max_seqlen          int32 []   the longest segment
  sample_loss_weight  float32 [s] loss_mask / (trained labels of its conversation): per-sample
                                 normalisation (see batch.loss_weights)
  real_tokens         int32 []   positions holding conversations (packing efficiency)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from functools import partial

import numpy as np
import torch

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset

from melama_mcore.data.blend import Blend, load_blend
from melama_mcore.data.dataset import _MegatronTokenizerView, build_blended
from melama_mcore.data.sft.indexed import SFTIndexedData
from melama_mcore.data.sft.packing import PackingPlan, build_plan
from melama_mcore.data.tokenizer import Tokenizer
from melama_mcore.errors import DataError


class PackedSFTDataset(MegatronDataset):
    """Packed sequences of one preprocess-sft prefix (the conversations `indices` of one split)."""

    def __init__(self, dataset: SFTIndexedData, dataset_path: str, indices: np.ndarray, num_samples: int | None,
                 index_split, config: BlendedMegatronDatasetConfig):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        # The cached plan must not outlive the files it indexes: their identity joins the hash.
        self.unique_identifiers["data"] = dataset.identity
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()
        self.seq_length = config.sequence_length
        self.pad_id = config.tokenizer.pad_or_eos
        indices = np.asarray(indices, np.int64)
        if len(indices) == 0 and num_samples != 0:
            raise DataError(f"{dataset_path}: its {index_split.name} split holds no conversation "
                            f"(check data.split)")
        positions = dataset.lengths[indices] - 1
        if len(positions) and positions.max() > self.seq_length:
            longest = int(positions.max())
            raise DataError(f"{dataset_path}: a sample needs {longest:,} positions, more than the training "
                            f"sequence length {self.seq_length:,}: run preprocess-sft with --seq-length "
                            f"{self.seq_length} (it was {dataset.meta.get('seq_length')})")
        if num_samples == 0:  # a split built only because the blend names it: no epoch needed
            self.plan = PackingPlan(np.zeros(1, np.int64), np.zeros(0, np.int64), 0)
        else:
            self.plan = self._load_or_build_plan(indices, positions)

    def _load_or_build_plan(self, ids: np.ndarray, positions: np.ndarray) -> PackingPlan:
        cache = self.config.path_to_cache
        path = None
        if cache:
            path = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-"
                                       f"{self.index_split.name}-plan.npz")
            if os.path.isfile(path):
                try:
                    with np.load(path, allow_pickle=False) as saved:
                        plan = PackingPlan(saved["offsets"], saved["members"], int(saved["epochs"]))
                    if plan.offsets[-1] == len(plan.members) and np.isin(plan.members, ids).all():
                        return plan
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                    pass  # unreadable: built again below and replaced
        plan = build_plan(ids, positions, self.seq_length, self.config.random_seed, self.num_samples)
        if path is not None:
            os.makedirs(cache, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.incomplete.npz"  # np.savez keeps an .npz name as given
            np.savez(tmp, offsets=plan.offsets, members=plan.members, epochs=plan.epochs)
            os.replace(tmp, path)
        return plan

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SFTIndexedData) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: BlendedMegatronDatasetConfig) -> SFTIndexedData:
        return SFTIndexedData(dataset_path, config.tokenizer.vocab_size)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return packed_row((self.dataset.sample(int(c)) for c in self.plan.sequence(int(idx))), self.seq_length,
                          self.pad_id)


def packed_row(conversations, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed sequence (the fields in the module docstring) from its conversations, each a pair
    (token ids, loss mask) as preprocess-sft stores them."""
    s = seq_length
    tokens = np.full(s, pad_id, dtype=np.int64)
    labels = np.full(s, pad_id, dtype=np.int64)
    loss_mask = np.zeros(s, dtype=np.float32)
    weight = np.zeros(s, dtype=np.float32)
    position_ids = np.zeros(s, dtype=np.int64)
    cu_seqlens = np.full(s + 1, -1, dtype=np.int32)
    cu_seqlens[0] = 0
    at, longest, segment = 0, 0, 0
    for ids, mask in conversations:
        n = len(ids) - 1
        tokens[at:at + n], labels[at:at + n] = ids[:-1], ids[1:]
        loss_mask[at:at + n] = mask[1:]
        trained = loss_mask[at:at + n].sum()
        weight[at:at + n] = loss_mask[at:at + n] / max(trained, 1.0)
        position_ids[at:at + n] = np.arange(n)
        at, longest, segment = at + n, max(longest, n), segment + 1
        cu_seqlens[segment] = at
    real = at
    if at < s:  # the padding: one more segment, attending only to itself, with no loss
        position_ids[at:] = np.arange(s - at)
        longest = max(longest, s - at)
        cu_seqlens[segment + 1] = s
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens), "max_seqlen": torch.tensor(longest, dtype=torch.int32),
            "sample_loss_weight": torch.from_numpy(weight), "real_tokens": torch.tensor(real, dtype=torch.int32)}


class _SFTTokenizerView(_MegatronTokenizerView):
    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.pad_or_eos = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def build_sft_datasets(blend: Blend, *, tokenizer: Tokenizer, seq_length: int, seed: int, train_samples: int,
                       valid_samples: int, split: str = "98,2,0", cache_dir: str | None = None
                       ) -> tuple[torch.utils.data.Dataset, dict[str, torch.utils.data.Dataset]]:
    """(train dataset of `train_samples` packed sequences, {source name: valid dataset}), as
    build_pretraining_datasets but for a blend of preprocess-sft prefixes. Each source's weight is
    split over its prefixes in proportion to their tokens."""
    blend = load_blend(blend)
    tokens = {}
    for source in blend.sources:
        for prefix in source.train + (source.valid or []):
            if prefix not in tokens:
                tokens[prefix] = SFTIndexedData(prefix, tokenizer.vocab_size).meta["counts"]["tokens"]
    config = partial(BlendedMegatronDatasetConfig, random_seed=seed, sequence_length=seq_length,
                     tokenizer=_SFTTokenizerView(tokenizer), path_to_cache=cache_dir)
    return build_blended(PackedSFTDataset, config, blend, tokens, train_samples=train_samples,
                         valid_samples=valid_samples, split=split)
