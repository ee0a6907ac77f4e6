"""Hostile inputs: a clear FILE:LINE error without the document text, or counted skips; and never an
output pair that looks valid after a failed or killed run."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import read_documents
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
    # JSON's words for what the value is, not Python's ("a dict")
    "not_a_string": (json.dumps({"text": {"note": SECRET}}).encode() + b"\n",
                     "key 'text' is an object, expected a string"),
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

    def record(self):
        return {**self._tok.record(), "vocab_size": self.vocab_size}


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


# ----- issue 14: damaged compressed inputs, output paths, misleading messages, small truths -----

def _only_error(err: str, *fragments: str) -> str:
    """The CLI's stderr is one `error:` line naming every fragment, with no traceback or document text."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and SECRET not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _noisy_jsonl(n: int = 3000) -> bytes:
    """Poorly compressible records (random digits), so the compressed stream has many blocks and a
    cut falls after records that already decoded."""
    rng = np.random.default_rng(0)
    return b"".join(json.dumps({"text": f"{SECRET} note {i} " + "".join(map(str, rng.integers(0, 10, 300)))})
                    .encode() + b"\n" for i in range(n))


def _compressed(kind: str, data: bytes) -> bytes:
    import gzip

    import zstandard

    # write_checksum: as the zstd command line writes frames; without it, zstd cannot see flipped bytes.
    return gzip.compress(data) if kind == "gz" else zstandard.ZstdCompressor(write_checksum=True).compress(data)


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_damaged_compressed_input_is_its_own_error(kind, damage, on_error, tmp_path, spm_model, capsys):
    # Issue 14.1: a cut or corrupt stream used to exit 0 with part of the data (zst + skip), be reported
    # as "malformed JSON" at its last line (zst), or end in an EOFError / BadGzipFile traceback (gz).
    data = _compressed(kind, _noisy_jsonl())
    if damage == "truncated":
        data = data[:len(data) * 6 // 10]
    else:  # flip bytes in the middle of the stream
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64]) + data[middle + 64:]
    path = tmp_path / f"in.jsonl.{kind}"
    path.write_bytes(data)
    rc = _run(path, tmp_path, spm_model, "--workers", "2", "--on-error", on_error)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    line = _only_error(err, str(path), f"{damage} compressed stream")
    assert "malformed JSON" not in line
    assert _leftovers(tmp_path) == []


def test_empty_compressed_file_is_truncated(tmp_path, spm_model, capsys):
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(b"")
    assert _run(path, tmp_path, spm_model, "--on-error", "skip") == 2
    _only_error(capsys.readouterr().err, str(path), "truncated compressed stream")
    assert _leftovers(tmp_path) == []


def test_multi_frame_zstd_reads_every_frame(tmp_path, spm_model, sp):
    # pzstd and `cat a.zst b.zst` write several frames: all of them are the file.
    import zstandard

    records = [_good(i) for i in range(6)]
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(b"".join(compressor.compress(b"".join(records[i:i + 2])) for i in range(0, 6, 2)))
    assert _run(path, tmp_path, spm_model) == 0
    assert read_documents(tmp_path / "out_text_document") == [[1] + sp.encode(GOOD[i]) for i in range(6)]


def test_directory_as_input_is_named_a_directory(tmp_path, spm_model, capsys):
    (tmp_path / "pubmed").mkdir()
    assert _run(tmp_path / "pubmed", tmp_path, spm_model) == 2
    line = _only_error(capsys.readouterr().err, "pubmed: is a directory", "pubmed/*.jsonl.zst")
    assert "not found" not in line


@pytest.mark.parametrize("command", ["preprocess", "preprocess-sft"])
@pytest.mark.parametrize("case", ["file_as_folder", "file_deeper", "output_is_a_folder", "unwritable", "under_proc",
                                  "a_folder"])
def test_output_prefix_that_cannot_be_written(command, case, tmp_path, spm_model, monkeypatch, capsys):
    # Issues 14.3 and 19.1: a one-line error before any work, exit 2, nothing left behind.
    from melama_mcore.data.sft import preprocess as sft_preprocess_module  # its own name for run_pipeline

    for module in (preprocess_module, sft_preprocess_module):
        monkeypatch.setattr(module, "run_pipeline", lambda *a, **k: pytest.fail("work started"))
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "x", "conversations": [{"from": "human", "value": "q"},
                                                               {"from": "gpt", "value": "a"}]}) + "\n")
    (tmp_path / "afile").write_text("not a folder")
    kind = "text" if command == "preprocess" else "sft"
    if case == "file_as_folder":
        prefix, message = tmp_path / "afile" / "out", "afile is a file, not a folder"
    elif case == "file_deeper":
        prefix, message = tmp_path / "afile" / "sub" / "out", "afile is a file, not a folder"
    elif case == "output_is_a_folder":
        (tmp_path / f"o_{kind}_document.idx").mkdir()
        prefix, message = tmp_path / "o", f"o_{kind}_document.idx is a folder"
    elif case == "unwritable":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if os.access(locked, os.W_OK):  # root ignores permissions: use a read-only kernel folder instead
            locked = Path("/proc/self/fdinfo")
        prefix, message = locked / "new" / "out", "cannot create the folder"
    elif case == "under_proc":
        prefix, message = Path("/proc/out"), "cannot write in /proc"
    else:
        prefix, message = f"{tmp_path}{os.sep}", "not a folder"
    before = sorted(tmp_path.rglob("*"))
    rc = melama([command, "--input", str(path), "--output-prefix", str(prefix), "--tokenizer-model", spm_model,
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    _only_error(err, f"--output-prefix {prefix}", message)
    assert sorted(tmp_path.rglob("*")) == before


def test_missing_output_folders_are_created(tmp_path, spm_model):
    path = _write_input(tmp_path, _good(4))
    assert _run(path, tmp_path / "new" / "deeper", spm_model) == 0
    assert verify_indexed_dataset(tmp_path / "new" / "deeper" / "out_text_document").documents == 5


def test_empty_tokenizer_folder_is_not_a_missing_package(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    path = _write_input(tmp_path, _good(4))
    assert _run(path, tmp_path, str(tmp_path / "tok")) == 2
    line = _only_error(capsys.readouterr().err, "tok: a folder without tokenizer files", "tokenizer.json")
    assert "sentencepiece" not in line.replace("sentencepiece .model", "") and "installed" not in line


@pytest.mark.parametrize("vocab, message, advice", [
    ("300", "--vocab-size 300 is too small for this corpus", "use --vocab-size"),
    ("100000", "--vocab-size 100000 is more than this corpus can fill", "or less"),
])
def test_train_tokenizer_vocabulary_messages_in_melama_terms(vocab, message, advice, tmp_path, corpus, capsys):
    # sentencepiece's own text names --character_coverage and its source lines: not melama's options.
    rc = melama(["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix", str(tmp_path / "t"),
                 "--vocab-size", vocab])
    assert rc == 2
    line = _only_error(capsys.readouterr().err, message, advice)
    assert "character_coverage" not in line and "trainer_interface" not in line
    assert not (tmp_path / "t.model").exists()
    advised = line.split("use --vocab-size ")[1].split()[0]
    # the advice is right: that size trains
    assert melama(["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix", str(tmp_path / "t"),
                   "--vocab-size", advised]) == 0


def test_empty_input_writes_an_empty_dataset_and_says_so(tmp_path, spm_model, capsys):
    # Issue 14.10: exit 0 with an empty pair is right (one empty shard among many), but the summary
    # says it, and verify-data refuses the pair as training data.
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _run(empty, tmp_path, spm_model) == 0
    out = capsys.readouterr().out
    assert "documents: 0 written\n" in out and "0/s" not in out
    assert "warning:   the dataset is empty" in out
    assert melama(["verify-data", str(tmp_path / "out_text_document")]) == 2
    _only_error(capsys.readouterr().err, "out_text_document: empty dataset (0 documents")


@pytest.mark.parametrize("count, seconds, shown", [
    (1, 60.0, " (0.0167/s)"), (3, 1.0, " (3/s)"), (12_345, 2.0, " (6,172/s)"), (0, 1.0, ""), (5, 0.001, "")])
def test_summary_rates_are_true(count, seconds, shown):
    summary = preprocess_module.Summary(outputs=["x"], documents=count, seconds=seconds)
    assert summary.lines()[0] == f"documents: {count:,} written{shown}"


def _tree(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _gone(processes, timeout: float) -> bool:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive if p.is_running())


@pytest.mark.slow
def test_workers_die_with_a_killed_main_process(tmp_path, corpus, spm_model):
    # Issue 14.6: kill -9 of `melama preprocess` (the main process only, as `kill -9 PID` does) used to
    # leave its workers running forever.
    proc = _start(tmp_path, _big_corpus(tmp_path, corpus), spm_model)
    workers = _tree(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(workers, timeout=5)


@pytest.mark.slow
def test_sigterm_to_a_worker_ends_the_run_with_one_line(tmp_path, corpus, spm_model):
    # A worker killed by SIGTERM (or by the kernel when out of memory) stops the run with a message,
    # not a BrokenProcessPool traceback; the other worker goes too.
    proc = _start(tmp_path, _big_corpus(tmp_path, corpus), spm_model)
    workers = _tree(proc.pid)
    workers[0].terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    _only_error(err.decode(), "a tokeniser worker process died", "nothing was written")
    assert _gone(workers, timeout=5)
    assert _leftovers(tmp_path) == []


# ----- issue 19: existing outputs, inputs listed twice, the worker pool's error exits, verify-data -----

_RECORD = {"text": "a note", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize("command", ["preprocess", "preprocess-sft"])
def test_existing_outputs_are_kept_unless_overwrite(command, tmp_path, spm_model, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_RECORD) + "\n")
    args = [command, "--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", spm_model,
            "--no-progress", "--workers", "1"]
    assert melama(args) == 0
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in tmp_path.glob("out*")}
    src.write_text(json.dumps(_RECORD) + "\n" + json.dumps(_RECORD) + "\n")
    assert melama(args) == 2
    _only_error(capsys.readouterr().err, f"--output-prefix {tmp_path / 'out'}", "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out*")} == first
    assert melama(args + ["--overwrite"]) == 0
    second = {p.name: p.read_bytes() for p in tmp_path.glob("out*")}
    assert second.keys() == first.keys() and second != first


def test_train_tokenizer_keeps_an_existing_model_unless_overwrite(tmp_path, corpus, spm_model, capsys):
    for ext in (".model", ".vocab"):
        shutil.copyfile(spm_model[:-len(".model")] + ext, tmp_path / f"t{ext}")
    before = (tmp_path / "t.model").read_bytes()
    args = ["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix", str(tmp_path / "t"),
            "--vocab-size", "300"]
    assert melama(args) == 2
    _only_error(capsys.readouterr().err, f"--model-prefix {tmp_path / 't'}: {tmp_path / 't.model'} already exists",
                "--overwrite")
    assert (tmp_path / "t.model").read_bytes() == before
    assert melama(["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix", "/proc/t/spm"]) == 2
    _only_error(capsys.readouterr().err, "--model-prefix /proc/t/spm: cannot create the folder /proc/t")


@pytest.mark.parametrize("how", ["named_twice", "glob_and_name", "link"])
@pytest.mark.parametrize("command", ["preprocess", "preprocess-sft"])
def test_an_input_read_twice_is_refused(command, how, tmp_path, spm_model, capsys):
    src = tmp_path / "in" / "a.jsonl"
    src.parent.mkdir()
    src.write_text(json.dumps(_RECORD) + "\n")
    if how == "named_twice":
        inputs, message = [str(src), str(src)], f"{src} is listed twice"
    elif how == "glob_and_name":
        inputs, message = [str(tmp_path / "in" / "*.jsonl"), str(src)], f"{src} is listed twice"
    else:
        (tmp_path / "b.jsonl").symlink_to(src)
        inputs, message = [str(src), str(tmp_path / "b.jsonl")], f"{tmp_path / 'b.jsonl'} and {src} are the same file"
    assert melama([command, "--input", *inputs, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
                   spm_model, "--no-progress"]) == 2
    _only_error(capsys.readouterr().err, message, "list each file once")
    assert _leftovers(tmp_path) == []


def test_instruction_records_given_to_preprocess_name_preprocess_sft(tmp_path, spm_model, capsys):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": SECRET}]}) + "\n")
    assert _run(src, tmp_path, spm_model) == 2
    _only_error(capsys.readouterr().err, f"{src}:1: missing key 'text' (an instruction record: use melama "
                                         "preprocess-sft)")


def _failing_input(tmp_path, command) -> Path:
    """Records enough for several batches in flight on 2 workers, then a bad one."""
    if command == "preprocess":
        good, bad = (json.dumps({"text": f"note {i} " * 20}) for i in range(1500)), '{"text": 3}'
    else:
        good = (json.dumps({"instruction": f"q {i} " * 10, "output": f"a {i}"}) for i in range(1500))
        bad = '{"conversations": 3}'
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([*good, bad]) + "\n")
    return path


@pytest.mark.parametrize("command", ["preprocess", "preprocess-sft"])
def test_error_exits_leave_no_pool_behind(command, tmp_path, spm_model, capsys):
    # Issue 19.5: the pool used to be shut down without waiting; its thread, still closing its pipes when
    # the interpreter exited, raced concurrent.futures' exit hook: "Exception ignored in: <module
    # 'threading'> ... Bad file descriptor", 1 run in 10-25. Every error exit now returns with the pool's
    # threads ended and its workers gone, so nothing is left to race (checked 10 times: the old code
    # failed this every time), and a real process ends with the one error line.
    path = _failing_input(tmp_path, command)
    args = [command, "--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", spm_model,
            "--no-progress", "--workers", "2"]
    threads = set(threading.enumerate())
    for _ in range(10):
        assert melama(args) == 2
        assert set(threading.enumerate()) <= threads and multiprocessing.active_children() == []
    _only_error(capsys.readouterr().err.splitlines()[-1], f"{path}:1501: ")
    proc = subprocess.run([sys.executable, "-m", "melama_mcore.cli", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    _only_error(proc.stderr, f"{path}:1501: ")
    assert _leftovers(tmp_path) == []


def test_verify_data_names_what_was_meant(tmp_path, corpus, spm_model, other_spm_model, capsys):
    preprocess_module.preprocess([str(corpus["general"])], str(tmp_path / "pubmed"), spm_model, progress=False)
    assert melama(["verify-data", str(tmp_path / "pubmed")]) == 2  # the --output-prefix, not the dataset prefix
    _only_error(capsys.readouterr().err, f"did you mean {tmp_path / 'pubmed_text_document'}?")
    prefix = str(tmp_path / "pubmed_text_document")
    assert melama(["verify-data", prefix, "--tokenizer-model", spm_model]) == 0
    capsys.readouterr()
    assert melama(["verify-data", prefix, "--tokenizer-model", other_spm_model]) == 2
    _only_error(capsys.readouterr().err, f"tokenised with {spm_model} (400 tokens), but --tokenizer-model is "
                                         f"{other_spm_model} (400 tokens, another vocabulary)")


def test_verify_data_checks_both_pairs_of_instruction_data(tmp_path, spm_model, capsys):
    from melama_mcore.data.sft.preprocess import preprocess_sft

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_RECORD) + "\n")
    prefix = preprocess_sft([str(src)], str(tmp_path / "chat"), spm_model, progress=False).prefix
    assert melama(["verify-data", prefix]) == 0
    capsys.readouterr()
    os.remove(f"{prefix}_loss_mask.idx")
    assert melama(["verify-data", prefix]) == 2
    _only_error(capsys.readouterr().err, f"{prefix}_loss_mask.idx: not found")


def test_inputs_pointing_at_the_wrong_thing_say_what_to_pass(tmp_path, spm_model, hf_tokenizer_dir, capsys):
    # Issue 19's audit: each is one line naming what was given and what to give instead.
    import yaml

    from melama_mcore.data.sft.preprocess import preprocess_sft

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_RECORD) + "\n")
    tokenizer_json = tmp_path / "hf" / "tokenizer.json"
    tokenizer_json.parent.mkdir()
    tokenizer_json.write_text("{}")
    chat = preprocess_sft([str(src)], str(tmp_path / "chat"), spm_model, progress=False).prefix
    mask_blend = tmp_path / "mask.yaml"
    mask_blend.write_text(yaml.safe_dump([{"name": "chat", "weight": 1, "train": f"{chat}_loss_mask"}]))
    out = ["--output-prefix", str(tmp_path / "out"), "--no-progress"]
    cases = [
        (["preprocess", "--input", str(src), "--tokenizer-model", str(tokenizer_json), *out],
         f"{tokenizer_json}: a file of a Hugging Face tokenizer folder; pass the folder, {tokenizer_json.parent}"),
        (["preprocess", "--input", str(src), "--tokenizer-model", str(src), *out],
         "not a usable sentencepiece model"),
        (["preprocess", "--input", str(src), "--tokenizer-model", spm_model, "--json-keys", "text", "text", *out],
         "--json-keys text text: a key is listed twice"),
        (["preprocess-sft", "--input", str(src), "--tokenizer-model", spm_model, "--chat-template", hf_tokenizer_dir,
          *out], "a folder; pass a Jinja file, or --chat-template hf"),
        (["verify-data", str(tmp_path)], f"{tmp_path} is a folder holding {chat}"),
        (["blend-report", str(mask_blend), "--samples", "4", "--seq-length", "8"],
         f"{chat}_loss_mask is the loss mask of the instruction data {chat}, not tokens; list {chat} instead"),
    ]
    for args, message in cases:
        assert melama(args) == 2, args
        _only_error(capsys.readouterr().err, message)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("command", ["preprocess", "preprocess-sft"])
def test_a_failed_run_removes_the_folders_it_created(command, tmp_path, spm_model, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(_RECORD) + "\n{broken\n")
    assert melama([command, "--input", str(path), "--output-prefix", str(tmp_path / "new" / "deeper" / "out"),
                   "--tokenizer-model", spm_model, "--no-progress", "--workers", "1"]) == 2
    _only_error(capsys.readouterr().err, f"{path}:2: malformed JSON")
    assert not (tmp_path / "new").exists()
