"""Blends, megatron-core datasets and the loader: shares, determinism, data-parallel invariance, resume."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from melama_mcore.cli import main as melama
from melama_mcore.data.blend import load_blend
from melama_mcore.data.dataset import build_pretraining_datasets
from melama_mcore.data.loader import build_loader
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import ConfigError

SEQ = 32


@pytest.fixture(scope="module")
def prefixes(corpus, spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("blend")
    result = {}
    for name, path in corpus.items():
        preprocess([str(path)], str(out / name), spm_model, append_eod=True, progress=False)
        result[name] = str(out / f"{name}_text_document")
    return result


@pytest.fixture(scope="module")
def tok(spm_model):
    return load_tokenizer(spm_model)


def _spec(prefixes, weights=(15, 1, 4)):
    return [{"name": n, "weight": w, "train": prefixes[n]}
            for n, w in zip(("biomedical", "clinical", "general"), weights)]


def _token_count(prefix) -> int:
    """Tokens per megatron-core's own reader (kept alive while its mmap'd lengths are read)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return int(dataset.sequence_lengths.sum())


def _train_part_tokens(prefix, share) -> int:
    """Tokens of the first `share` of the documents, per megatron-core's reader: the train part a split
    such as 98,2,0 leaves training."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return int(dataset.sequence_lengths[:round(share * len(dataset))].sum())


def _samples(loader, n):
    return list(itertools.islice(loader, n))


def test_load_blend_keeps_relative_prefixes_relative_to_the_working_directory(tmp_path):
    # The rule (blend.py, `melama blend-report --help`): relative to where melama runs, not to the file.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "blend.yaml").write_text(
        "sources:\n  - {name: a, weight: 3, train: [data/x_text_document, /abs/y.bin]}\n"
        "  - {name: b, weight: 1, train: z}\n")
    blend = load_blend(str(tmp_path / "b" / "blend.yaml"))
    assert blend.sources[0].train == ["data/x_text_document", "/abs/y"]
    assert blend.normalized_weights() == [0.75, 0.25]


@pytest.mark.parametrize("spec, message", [
    ([], "non-empty list"),
    ({"source": []}, "sources"),
    ([{"name": "a", "weight": 0, "train": "x"}], "positive finite number"),
    ([{"name": "a", "weight": float("inf"), "train": "x"}], "positive finite number"),
    ([{"name": "a", "weight": 1e308, "train": "x"}, {"name": "b", "weight": 1e308, "train": "y"}],
     "add up to more than a float holds"),
    ([{"name": "a", "weight": 1}], "missing keys"),
    ([{"name": "a", "weight": 1, "train": "x", "wieght": 2}], "unknown keys"),
    ([{"name": "a", "weight": 1, "train": []}], "non-empty list of prefixes"),
    ([{"name": "a", "weight": 1, "train": "x"}, {"name": "a", "weight": 1, "train": "y"}], "unique"),
    ([{"name": "a", "weight": 1, "train": "x", "valid": "v"}, {"name": "b", "weight": 1, "train": "y"}],
     "every source or for none"),
])
def test_load_blend_rejects_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_blend(spec)


def test_example_blend_parses():
    blend = load_blend("examples/blends/me_llama_15_1_4.yaml")
    assert [s.name for s in blend.sources] == ["biomedical", "clinical", "general"]
    assert blend.normalized_weights() == [0.75, 0.05, 0.2]


def test_shares_15_1_4_deterministic(prefixes, tok):
    def build():
        train, valid = build_pretraining_datasets(_spec(prefixes), tokenizer=tok, seq_length=SEQ, seed=7,
                                                  train_samples=10_000, valid_samples=16)
        return train, valid
    train, valid = build()
    assert len(train) == 10_000
    ids = np.array([int(b["dataset_id"][0]) for b in _samples(
        build_loader(train, consumed_samples=0, micro_batch_size=1, dp_rank=0, dp_size=1), 10_000)])
    shares = np.bincount(ids, minlength=3) / len(ids)
    assert np.allclose(shares, [0.75, 0.05, 0.20], atol=0.01), shares
    sample = train[123]
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"} and "attention_mask" not in sample
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert sorted(valid) == ["biomedical", "clinical", "general"] and all(len(v) == 16 for v in valid.values())
    again, _ = build()
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 10_000, 97))


def test_source_weight_split_over_prefixes_by_tokens(prefixes, tok, tmp_path, corpus, spm_model):
    # "general" made of two prefixes: the clinical data and the general data. Its 50% weight must be
    # split over them in proportion to their token counts (read from megatron-core's index).
    spec = [{"name": "bio", "weight": 1, "train": prefixes["biomedical"]},
            {"name": "mixed", "weight": 1, "train": [prefixes["clinical"], prefixes["general"]]}]
    train, _ = build_pretraining_datasets(spec, tokenizer=tok, seq_length=SEQ, seed=1,
                                          train_samples=20_000, valid_samples=0)
    tokens = [_token_count(prefixes[n]) for n in ("clinical", "general")]
    shares = np.bincount(train.dataset_index, minlength=3) / len(train)
    expected = [0.5, 0.5 * tokens[0] / sum(tokens), 0.5 * tokens[1] / sum(tokens)]
    assert np.allclose(shares, expected, atol=0.01), (shares, expected)


def test_dp1_and_dp2_see_the_same_global_sequence_and_resume(prefixes, tok):
    train, _ = build_pretraining_datasets(_spec(prefixes), tokenizer=tok, seq_length=SEQ, seed=3,
                                          train_samples=200, valid_samples=0)
    steps = 60  # 60 x 4 samples > 200: also crosses the wrap-around
    dp1 = _samples(build_loader(train, consumed_samples=0, micro_batch_size=4, dp_rank=0, dp_size=1), steps)
    ranks = [_samples(build_loader(train, consumed_samples=0, micro_batch_size=2, dp_rank=r, dp_size=2), steps)
             for r in range(2)]
    for g in range(steps):
        assert torch.equal(dp1[g]["tokens"], torch.cat([ranks[0][g]["tokens"], ranks[1][g]["tokens"]]))
    assert torch.equal(dp1[50]["tokens"], dp1[0]["tokens"])  # sample 200 is sample 0 again
    resumed = _samples(build_loader(train, consumed_samples=4 * 17, micro_batch_size=2, dp_rank=1, dp_size=2), 5)
    for k, batch in enumerate(resumed):
        assert all(torch.equal(batch[key], ranks[1][17 + k][key]) for key in batch)
    with pytest.raises(ConfigError, match="multiple"):
        build_loader(train, consumed_samples=3, micro_batch_size=2, dp_rank=0, dp_size=2)


def test_explicit_valid_prefixes(prefixes, tok):
    spec = [{"name": n, "weight": 1, "train": prefixes[n], "valid": prefixes[n]} for n in ("clinical", "general")]
    train, valid = build_pretraining_datasets(spec, tokenizer=tok, seq_length=SEQ, seed=0,
                                              train_samples=100, valid_samples=8)
    assert len(train) == 100 and {k: len(v) for k, v in valid.items()} == {"clinical": 8, "general": 8}


def test_a_one_prefix_blend_prints_no_single_dataset_note(prefixes, tok, caplog):
    """Issue 19: megatron's "Building a BlendedDataset for a single MegatronDataset" came with every
    run of one train prefix (build_blended weights it like any blend, on purpose): a note that asks
    nothing of the user."""
    spec = [{"name": "general", "weight": 1, "train": prefixes["general"]}]
    with caplog.at_level(logging.INFO):
        train, _ = build_pretraining_datasets(spec, tokenizer=tok, seq_length=SEQ, seed=0, train_samples=20,
                                              valid_samples=0)
    assert len(train) == 20 and type(train).__name__ == "BlendedDataset"  # megatron's, built as before
    assert "single MegatronDataset" not in caplog.text


def test_blend_report(prefixes, tmp_path, capsys):
    blend = tmp_path / "blend.yaml"
    blend.write_text("sources:\n" + "".join(
        f"  - {{name: {n}, weight: {w}, train: {prefixes[n]}}}\n"
        for n, w in zip(("biomedical", "clinical", "general"), (15, 1, 4))))
    assert melama(["blend-report", str(blend), "--samples", "10000", "--seq-length", "100"]) == 0
    out = capsys.readouterr().out
    clinical_tokens = _train_part_tokens(prefixes["clinical"], 0.98)
    row = next(line for line in out.splitlines() if line.startswith("clinical"))
    assert "5.0%" in row and f"{clinical_tokens:,}" in row
    assert f"{0.05 * 10000 * 100 / clinical_tokens:.2f}" in row
    assert melama(["blend-report", str(tmp_path / "missing.yaml"), "--samples", "1", "--seq-length", "1"]) == 2
