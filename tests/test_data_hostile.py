"""Hostile inputs: a clear FILE:LINE error without the document text, or counted skips; and never an
output pair that looks valid after a failed or killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import read_documents, sp, spm_model, corpus  # noqa: F401
from melama_mcore.cli import main as melama
from melama_mcore.data import preprocess as preprocess_module
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.data.verify import verify_indexed_dataset
from melama_mcore.errors import DataError

SECRET = "Jane Roe MRN 0047-1123 diagnosed"  # stands for patient text: must never be printed
GOOD = [f"{SECRET} note {i}" for i in range(6)]


def _good(i):
    return json.dumps({"text": GOOD[i]}).encode() + b"\n"


# line 3 (1-based) of each input is the bad record
HOSTILE = {
    "malformed_json": (b'{"text": "' + SECRET.encode() + b'", \n', "malformed JSON"),
    "missing_key": (json.dumps({"body": SECRET}).encode() + b"\n", "missing key 'text'"),
    "not_a_string": (json.dumps({"text": [SECRET]}).encode() + b"\n", "key 'text' is a list"),
    "non_utf8": (b'{"text": "' + SECRET.encode() + b' \xff\xfe"}\n', "not valid UTF-8"),
    "huge_document": (json.dumps({"text": SECRET * 200}).encode() + b"\n", "larger than --max-document-bytes"),
}


def _write_input(tmp_path, bad: bytes) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(_good(0) + _good(1) + bad + _good(2) + _good(3))
    return path


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def _run(path, tmp_path, spm_model, *extra):
    return melama(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-model", spm_model, "--max-document-bytes", "4096", "--no-progress", *extra])


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_record_stops_with_file_line_and_no_output(case, tmp_path, spm_model, capsys):
    bad, reason = HOSTILE[case]
    path = _write_input(tmp_path, bad)
    assert _run(path, tmp_path, spm_model, "--workers", "2") == 2
    err = capsys.readouterr().err
    assert f"{path}:3: " in err and reason in err
    assert SECRET not in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_record_skipped_and_counted(case, tmp_path, spm_model, sp, capsys):
    path = _write_input(tmp_path, HOSTILE[case][0])
    assert _run(path, tmp_path, spm_model, "--on-error", "skip") == 0
    out, err = capsys.readouterr()
    assert "skipped:   1 " in out and SECRET not in out + err
    assert read_documents(tmp_path / "out_text_document") == [[1] + sp.encode(GOOD[i]) for i in range(4)]


def test_huge_line_is_not_read_into_memory(tmp_path, spm_model, sp):
    # A 64 MiB line with a 1 MiB limit: skipped while reading, the next line still read correctly.
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"a" * (64 << 20) + b'"}\n')
        f.write(_good(0))
    summary = preprocess_module.preprocess([str(path)], str(tmp_path / "out"), spm_model, on_error="skip",
                                           max_document_bytes=1 << 20, progress=False)
    assert (summary.skipped, summary.documents) == (1, 1)
    assert read_documents(tmp_path / "out_text_document") == [[1] + sp.encode(GOOD[0])]


class _WideTokenizer:
    """The real tokenizer, claiming a vocabulary that does not fit uint16 (70,000 ids)."""

    def __init__(self, tok, vocab_size, shift=0):
        self._tok, self.vocab_size, self._shift = tok, vocab_size, shift
        self.path, self.bos_id, self.eos_id, self.pad_id = tok.path, tok.bos_id, tok.eos_id, None

    def encode_batch(self, texts):
        return [[i + self._shift for i in ids] for ids in self._tok.encode_batch(texts)]


def test_vocabulary_too_large_for_dtype(tmp_path, corpus, spm_model, monkeypatch, capsys):
    monkeypatch.setattr(preprocess_module, "load_tokenizer",
                        lambda path, **kw: _WideTokenizer(load_tokenizer(path, **kw), 70_000))
    args = ["preprocess", "--input", str(corpus["general"]), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-model", spm_model, "--no-progress", "--workers", "1"]
    assert melama(args + ["--dtype", "uint16"]) == 2
    assert "70,000 tokens does not fit uint16" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    assert melama(args) == 0  # auto picks int32, as Megatron-LM does
    assert np.dtype(verify_indexed_dataset(tmp_path / "out_text_document").dtype) == np.int32


def test_tokenizer_ids_outside_vocabulary(tmp_path, corpus, spm_model, monkeypatch, capsys):
    # A (broken) tokenizer whose ids exceed its own vocabulary: stop, never write wrapped ids.
    monkeypatch.setattr(preprocess_module, "load_tokenizer",
                        lambda path, **kw: _WideTokenizer(load_tokenizer(path, **kw), 400, shift=1000))
    assert melama(["preprocess", "--input", str(corpus["general"]), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-model", spm_model, "--no-progress", "--workers", "1"]) == 2
    assert "outside its vocabulary" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_missing_input_and_bad_tokenizer(tmp_path, spm_model, capsys):
    assert _run(tmp_path / "nope.jsonl", tmp_path, spm_model) == 2
    assert "nope.jsonl: input file not found" in capsys.readouterr().err
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a model")
    path = _write_input(tmp_path, _good(4))
    assert _run(path, tmp_path, str(bad_model)) == 2
    assert "not a usable sentencepiece model" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def _big_corpus(tmp_path, corpus) -> Path:
    """~20 MB of JSONL: long enough to interrupt mid-run."""
    path = tmp_path / "big.jsonl"
    data = corpus["biomedical"].read_bytes()
    with open(path, "wb") as f:
        for _ in range(60):
            f.write(data)
    return path


def _start(tmp_path, src, spm_model):
    cmd = [sys.executable, "-m", "melama_mcore.cli", "preprocess", "--input", str(src), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-model", spm_model, "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    partial = tmp_path / "out_text_document.bin.incomplete"
    deadline = time.time() + 60
    while not (partial.exists() and partial.stat().st_size > 100_000):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigkill_mid_run_leaves_no_valid_looking_output(tmp_path, corpus, spm_model):
    proc = _start(tmp_path, _big_corpus(tmp_path, corpus), spm_model)
    os.killpg(proc.pid, signal.SIGKILL)  # main process and workers: nothing gets to clean up
    proc.wait()
    assert not (tmp_path / "out_text_document.bin").exists()
    assert not (tmp_path / "out_text_document.idx").exists()
    with pytest.raises(DataError, match="not found"):
        verify_indexed_dataset(tmp_path / "out_text_document")


@pytest.mark.slow
def test_sigterm_mid_run_cleans_up(tmp_path, corpus, spm_model):
    proc = _start(tmp_path, _big_corpus(tmp_path, corpus), spm_model)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err
    assert _leftovers(tmp_path) == []


# ----- verify-data -----

@pytest.fixture()
def pair(tmp_path, corpus, spm_model):
    preprocess_module.preprocess([str(corpus["clinical"])], str(tmp_path / "d"), spm_model, progress=False)
    return tmp_path / "d_text_document"


def test_verify_accepts_good_pair(pair, sp, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    reference = IndexedDataset(str(pair))
    summary = verify_indexed_dataset(str(pair), sp.vocab_size())
    assert summary.tokens == int(reference.sequence_lengths.sum()) and summary.sequences == len(reference)
    assert summary.max_token_checked == max(int(reference[i].max()) for i in range(len(reference)))
    assert melama(["verify-data", str(pair), "--vocab-size", str(sp.vocab_size()), "--full"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == summary.tokens


def test_verify_truncated_bin(pair):
    bin_path = Path(f"{pair}.bin")
    os.truncate(bin_path, bin_path.stat().st_size - 2)
    with pytest.raises(DataError, match=r"d_text_document\.bin: .* truncated"):
        verify_indexed_dataset(pair)


def test_verify_idx_of_another_bin(pair, tmp_path, corpus, spm_model):
    preprocess_module.preprocess([str(corpus["general"])], str(tmp_path / "other"), spm_model, progress=False)
    os.replace(tmp_path / "other_text_document.idx", f"{pair}.idx")
    with pytest.raises(DataError, match="belongs to another .bin"):
        verify_indexed_dataset(pair)


def test_verify_tokens_outside_vocabulary(pair, sp, capsys):
    with pytest.raises(DataError, match="outside the vocabulary of 300"):
        verify_indexed_dataset(pair, vocab_size=300)
    assert melama(["verify-data", str(pair), "--vocab-size", "300"]) == 2
    assert "d_text_document.bin: token id" in capsys.readouterr().err


def test_verify_corrupt_index(pair):
    idx = Path(f"{pair}.idx")
    data = bytearray(idx.read_bytes())
    data[40] ^= 0xFF  # inside the lengths: offsets no longer follow
    idx.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"d_text_document\.idx: "):
        verify_indexed_dataset(pair)
    idx.write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad header"):
        verify_indexed_dataset(pair)
