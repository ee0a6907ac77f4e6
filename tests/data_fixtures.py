"""Shared fixtures for the data tests: a small synthetic corpus and a tiny LLaMA-style tokenizer,
built once per test session. Import the fixtures into a test module to use them."""

from __future__ import annotations

import json

import pytest

from melama_mcore.commands.demo_corpus import write_demo_corpus
from melama_mcore.data.train_tokenizer import train_sentencepiece

VOCAB_SIZE = 400


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{source name: path of a JSONL file with 300 documents}."""
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), docs_per_source=300, seed=0)


@pytest.fixture(scope="session")
def spm_model(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
    return str(train_sentencepiece([str(p) for p in corpus.values()], str(prefix), vocab_size=VOCAB_SIZE))


@pytest.fixture(scope="session")
def sp(spm_model):
    """The reference: sentencepiece itself, not our wrapper."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=spm_model)


def read_texts(path, key="text") -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def read_documents(prefix) -> list[list[int]]:
    """Documents of a .bin/.idx pair, read by megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]
