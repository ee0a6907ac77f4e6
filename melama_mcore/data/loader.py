"""Micro-batch iterators over a sample dataset, resumable from a consumed-sample count.

The order is one global sequence of sample indices, 0, 1, 2, ... (megatron's datasets are already
shuffled and blended), wrapping around at the end of the dataset. Global batch g of
`micro_batch_size * dp_size` consecutive samples is cut as Megatron-LM's pretraining sampler cuts
it: rank r takes samples [r * mbs, (r + 1) * mbs). So what a run sees depends only on
`consumed_samples`, not on the data-parallel size, and resuming continues exactly.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from melama_mcore.errors import ConfigError

LOADER_KINDS = ("default", "dali")


def rank_sample_indices(dataset_len: int, *, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[np.ndarray]:
    """Sample indices of this rank's successive micro-batches (infinite)."""
    if dataset_len <= 0:
        raise ConfigError("the dataset is empty")
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"bad loader layout: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                          f"dp_size={dp_size}")
    step = micro_batch_size * dp_size
    if consumed_samples < 0 or consumed_samples % step:
        raise ConfigError(f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x "
                          f"dp_size = {step}: a resumed run must start on a micro-batch boundary")
    return _indices(dataset_len, consumed_samples + dp_rank * micro_batch_size, micro_batch_size, step)


def _indices(dataset_len: int, start: int, micro_batch_size: int, step: int) -> Iterator[np.ndarray]:
    # A separate generator so that rank_sample_indices checks its arguments when called.
    offsets = np.arange(micro_batch_size, dtype=np.int64)
    while True:
        yield (start + offsets) % dataset_len
        start += step


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack megatron's per-sample dicts (tensors, or numpy scalars such as dataset_id)."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def _to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if device == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def build_loader(dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 kind: str = "default", device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Infinite iterator of this rank's micro-batches, starting after `consumed_samples` global samples.

    kind="dali" runs the same batches through a DALI pipeline (prefetching; see dali_loader).
    """
    indices = rank_sample_indices(len(dataset), consumed_samples=consumed_samples,
                                  micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    if kind not in LOADER_KINDS:
        raise ConfigError(f"unknown loader {kind!r} (choose from {', '.join(LOADER_KINDS)})")
    batches = (collate([dataset[int(i)] for i in batch]) for batch in indices)
    if kind == "dali":
        from melama_mcore.data.dali_loader import build_dali_loader  # optional extra: imported on use

        return build_dali_loader(batches, micro_batch_size=micro_batch_size, device=device)
    return (_to_device(batch, device) for batch in batches)
