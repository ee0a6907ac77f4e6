"""Helpers for the data tests (their fixtures, the corpus and tokenizer, are in conftest.py)."""

from __future__ import annotations

import json

VOCAB_SIZE = 400


def read_texts(path, key="text") -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def read_documents(prefix) -> list[list[int]]:
    """Documents of a .bin/.idx pair, read by megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]
