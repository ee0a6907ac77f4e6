"""Inputs that look legal but made megatron-core's dataset builder hang at 100% CPU or fail deep inside
(issue 14.12): each is refused up front by check_pretraining_data, with what to change, and the
inputs that only hung for want of a part nobody asked for now build. Each refusal was reproduced
on megatron-core 0.16.1 first (see melama_mcore/data/dataset.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from melama_mcore.cli import main as melama
from melama_mcore.data.dataset import check_pretraining_data
from melama_mcore.data.preprocess import preprocess
from melama_mcore.errors import ConfigError, DataError, UserError
from trunk_fixtures import run_train

SECRET = "Jane Roe MRN 0047-1123 diagnosed"  # stands for patient text: must never be printed


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus, spm_model):
    """Prefixes: `big` (300 documents), `ten` (10 short ones), `one` (1 document), `empty` (none)."""
    root = tmp_path_factory.mktemp("edges")
    inputs = {"ten": [f"{SECRET} note {i}" for i in range(10)], "one": [f"{SECRET} " * 40], "empty": []}
    prefixes = {}
    for name, texts in inputs.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        preprocess([str(path)], str(root / name), spm_model, append_eod=True, workers=1, progress=False)
        prefixes[name] = str(root / f"{name}_text_document")
    preprocess([str(corpus["clinical"])], str(root / "big"), spm_model, append_eod=True, workers=1, progress=False)
    prefixes["big"] = str(root / "big_text_document")
    return {"root": root, "tokenizer": spm_model, **prefixes}


def _blend_file(tmp_path, *sources) -> str:
    path = tmp_path / "blend.yaml"
    path.write_text("sources:\n" + "".join(f"  - {{name: {name}, weight: {weight}, train: {prefix}}}\n"
                                           for name, weight, prefix in sources))
    return str(path)


def _report(blend: str, *args: str) -> list[str]:
    return ["blend-report", blend, "--samples", "1000", "--seq-length", "16", *args]


def _refused(capsys, argv, *fragments):
    assert melama(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and SECRET not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----- through `melama blend-report`, which refuses what training refuses -----

@pytest.mark.parametrize("split, message", [
    ("-1,2", "expected one to three non-negative numbers"),  # megatron's regex reads 1,2
    ("1e3,1", "expected one to three non-negative numbers"),  # megatron reads 1,3,1
    ("abc", "expected one to three non-negative numbers"),  # megatron: NaN, ValueError deep inside
    ("98,2,0,5", "expected one to three non-negative numbers"),  # megatron: AssertionError
    ("0,0,100", "gives training no data"),
    ("0,0,0", "gives training no data"),
])
def test_split_strings_megatron_misreads(split, message, data, tmp_path, capsys):
    blend = _blend_file(tmp_path, ("big", 1, data["big"]))
    _refused(capsys, _report(blend, f"--split={split}"), f"split {split!r}", message, "98,2,0")


def test_empty_dataset_in_a_blend(data, tmp_path, capsys):
    # A 0-token dataset: megatron's epoch count `while tokens < requested: tokens += 0` never ends.
    blend = _blend_file(tmp_path, ("big", 3, data["big"]), ("nothing", 1, data["empty"]))
    _refused(capsys, _report(blend), "blend source 'nothing'", "empty_text_document is an empty dataset",
             "remove it from the blend")


def test_source_smaller_than_one_sample(data, tmp_path, capsys):
    # 1 document shorter than a sample: megatron repeats it samples x seq_length / tokens times (a
    # Python loop of hours on the 70B run, then an int32 overflow).
    blend = _blend_file(tmp_path, ("big", 3, data["big"]), ("tiny", 1, data["one"]))
    _refused(capsys, [*_report(blend)[:-1], "4096"], "blend source 'tiny'", "the train part of",
             "fewer than one sample of training.seq_length + 1 = 4,097 tokens", "lower training.seq_length")


def test_split_part_that_rounds_to_no_document(data, tmp_path, capsys):
    # One document split 50,50: round(0.5) = 0 documents for training.
    blend = _blend_file(tmp_path, ("tiny", 1, data["one"]))
    _refused(capsys, _report(blend, "--split", "50,50"), "the train part of", "documents 0 to 0 of 1",
             "holds no document", "raise the train share")


def test_missing_prefix_names_the_working_directory(data, tmp_path, capsys):
    blend = _blend_file(tmp_path, ("pubmed", 1, "data/pubmed_text_document"))
    _refused(capsys, _report(blend), "data/pubmed_text_document.bin / .idx not found",
             f"relative to the working directory, {os.getcwd()}")


def test_weights_that_overflow(data, tmp_path, capsys):
    blend = _blend_file(tmp_path, ("a", "1.0e+308", data["big"]), ("b", "1.0e+308", data["ten"]))
    _refused(capsys, _report(blend), "add up to more than a float holds")
    blend = _blend_file(tmp_path, ("a", ".inf", data["big"]))
    _refused(capsys, _report(blend), "positive finite number")


# ----- validation parts, counts, cache: check_pretraining_data, as the trainer calls it -----

def _check(data, blend, **overrides):
    args = dict(vocab_size=400, seq_length=16, train_samples=100, valid_samples=8, split="98,2,0", cache_dir=None)
    return check_pretraining_data(blend, **{**args, **overrides})


def test_valid_part_with_no_document_when_validation_is_asked_for(data):
    # 10 documents under 98,2,0: the valid part is documents 10 to 10. Asked for, megatron looped forever.
    blend = [{"name": "small", "weight": 1, "train": data["ten"]}]
    with pytest.raises(DataError, match=r"the valid part of .*documents 10 to 10 of 10.* holds no document.*"
                                        r"`valid` prefixes.*logging.eval_iters=0"):
        _check(data, blend)
    _check(data, blend, valid_samples=0)  # not asked for: fine (and it builds: see below)


def test_no_valid_share_when_validation_is_asked_for(data):
    blend = [{"name": "big", "weight": 1, "train": data["big"]}]
    with pytest.raises(ConfigError, match=r"split '100,0,0' has no valid part.*8 samples.*logging.eval_iters=0"):
        _check(data, blend, split="100,0,0")
    _check(data, blend, split="100,0,0", valid_samples=0)


def test_explicit_valid_prefix_that_is_empty(data):
    # megatron: "cannot mmap an empty file", deep inside.
    blend = [{"name": "big", "weight": 1, "train": data["big"], "valid": data["empty"]}]
    with pytest.raises(DataError, match="empty_text_document is an empty dataset"):
        _check(data, blend)


@pytest.mark.parametrize("field, value, message", [
    ("train_samples", 0, "train samples must be an integer of at least 1"),
    ("train_samples", -5, "train samples must be an integer of at least 1"),
    ("valid_samples", -1, "validation samples must be an integer of at least 0"),
    ("seq_length", 0, "training.seq_length must be an integer of at least 1"),
])
def test_sample_counts_and_lengths(field, value, message, data):
    # train_samples=0 also looped forever in megatron (0 samples still ask for 1 token of each part).
    with pytest.raises(ConfigError, match=message):
        _check(data, [{"name": "big", "weight": 1, "train": data["big"]}], **{field: value})


def test_more_prefixes_than_megatron_blends(data):
    blend = [{"name": f"s{i}", "weight": 1, "train": f"p{i}"} for i in range(32767)]
    with pytest.raises(ConfigError, match="32,767 train prefixes; megatron blends at most 32,766"):
        _check(data, blend)


def test_cache_dir_that_is_a_file_or_cannot_be_created(data, tmp_path):
    blend = [{"name": "big", "weight": 1, "train": data["big"]}]
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        _check(data, blend, cache_dir=str(tmp_path / "afile" / "cache"))
    with pytest.raises(UserError, match="cannot create the folder /proc/self/no"):
        _check(data, blend, cache_dir="/proc/self/no/cache")


def test_incomplete_cached_index_is_named(data, tmp_path):
    # A run killed while megatron saved its indices leaves a short .npy that every later start fails on.
    blend = [{"name": "big", "weight": 1, "train": data["big"]}]
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "abc-GPTDataset-train-shuffle_index.npy", np.arange(1000, dtype=np.uint32))
    _check(data, blend, cache_dir=str(cache))
    with open(cache / "abc-GPTDataset-train-shuffle_index.npy", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(DataError, match=r"abc-GPTDataset-train-shuffle_index.npy: an incomplete cached dataset "
                                        r"index .* delete it"):
        _check(data, blend, cache_dir=str(cache))


# ----- what hung now builds; and the trainer refuses through its CLI -----

BUILD = r"""
import sys
from melama_mcore.data.dataset import build_pretraining_datasets
from melama_mcore.data.tokenizer import load_tokenizer
model, prefix = sys.argv[1:]
train, valid = build_pretraining_datasets([{"name": "small", "weight": 1, "train": prefix}],
                                          tokenizer=load_tokenizer(model), seq_length=16, seed=0,
                                          train_samples=50, valid_samples=0)
print(len(train), len(valid))
"""


@pytest.mark.slow
def test_small_source_without_validation_builds(data):
    # Before: megatron built the (unused, empty) valid part of the default 98,2,0 too, and looped forever.
    result = subprocess.run([sys.executable, "-c", BUILD, data["tokenizer"], data["ten"]], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["50", "0"]


@pytest.mark.slow
def test_trainer_refuses_before_megatron_sees_it(data, tmp_path):
    blend = json.dumps([{"name": "big", "weight": 1, "train": data["big"]}])
    result = run_train(tmp_path / "run", [f"data.tokenizer={data['tokenizer']}", f"data.blend={blend}",
                                          "data.split=-1,2"], check=False, timeout=240)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert errors and all("split '-1,2': expected one to three non-negative numbers" in e for e in errors)
    assert "Traceback" not in result.stdout and SECRET not in result.stdout
