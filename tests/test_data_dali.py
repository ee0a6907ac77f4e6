"""The DALI loader yields exactly the default loader's batches, and resumes at the same position."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from melama_mcore.data.dataset import build_pretraining_datasets
from melama_mcore.data.loader import build_loader
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                reason="NVIDIA DALI not installed (pip install melama-mcore[dali])")


@pytest.fixture(scope="module")
def train(corpus, spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dali")
    spec = []
    for name, weight in (("biomedical", 15), ("clinical", 1), ("general", 4)):
        preprocess([str(corpus[name])], str(out / name), spm_model, append_eod=True, progress=False)
        spec.append({"name": name, "weight": weight, "train": str(out / f"{name}_text_document")})
    dataset, _ = build_pretraining_datasets(spec, tokenizer=load_tokenizer(spm_model), seq_length=24, seed=5,
                                            train_samples=120, valid_samples=0)
    return dataset


def _take(dataset, n, kind, **layout):
    return list(itertools.islice(build_loader(dataset, kind=kind, **layout), n))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_dali_batches_equal_default_batches(train, dp_rank):
    layout = dict(consumed_samples=0, micro_batch_size=3, dp_rank=dp_rank, dp_size=2)
    # 30 x 6 samples > 120: crosses the wrap-around too
    _assert_same(_take(train, 30, "dali", **layout), _take(train, 30, "default", **layout))


def test_dali_resumes_at_the_same_position(train):
    layout = dict(micro_batch_size=2, dp_rank=0, dp_size=1)
    full = _take(train, 12, "default", consumed_samples=0, **layout)
    resumed = _take(train, 5, "dali", consumed_samples=2 * 7, **layout)
    _assert_same(resumed, full[7:12])
