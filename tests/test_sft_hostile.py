"""preprocess-sft on hostile records: FILE:LINE and a reason without the record's text, or counted
skips; no output that looks complete after a failure (as tests/test_data_hostile.py for preprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sft_fixtures import read_sft
from melama_mcore.cli import main as melama
from melama_mcore.data.sft import indexed
from melama_mcore.data.sft.indexed import is_sft_prefix
from melama_mcore.data.sft.preprocess import preprocess_sft
from melama_mcore.errors import DataError

SECRET = "Jane Roe MRN 0047-1123"  # stands for patient text: must never be printed


def _conv(*turns):
    return {"conversations": [{"from": s, "value": v} for s, v in turns]}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


GOOD = [_line(_conv(("human", f"{SECRET} question {i}"), ("gpt", f"{SECRET} answer {i}"))) for i in range(4)]

# line 3 (1-based) of each input is the bad record
HOSTILE = {
    "malformed_json": (b'{"conversations": [{"from": "human", "value": "' + SECRET.encode() + b'"\n',
                       "malformed JSON"),
    "nesting_bomb": (b"[" * 3000 + b"\n", "nested too deeply"),
    "not_an_object": (_line([SECRET]), "a JSON list, expected an object"),
    "non_utf8": (b'{"instruction": "' + SECRET.encode() + b' \xff", "output": "x"}\n', "not valid UTF-8"),
    "huge_record": (_line({"instruction": SECRET * 300, "output": "x"}), "larger than --max-document-bytes"),
    "no_known_format": (_line({"text": SECRET}), "no 'conversations', 'messages' or 'instruction'/'output' key"),
    "turns_not_a_list": (_line({"conversations": SECRET}), "'conversations' is a string, expected a list"),
    "turn_not_an_object": (_line({"conversations": [SECRET]}), "turn 1: a string, expected an object"),
    "unknown_speaker": (_line(_conv((SECRET, "hi"), ("gpt", "x"))), "turn 1: unknown 'from'"),
    "value_not_a_string": (_line(_conv(("human", [SECRET]), ("gpt", "x"))), "turn 1: key 'value' is a list"),
    "missing_value": (_line({"conversations": [{"from": "human"}]}), "turn 1: missing key 'value'"),
    "not_alternating": (_line(_conv(("human", SECRET), ("human", SECRET), ("gpt", "x"))),
                        "turn 2: expected an answer"),
    "ends_with_prompt": (_line(_conv(("human", SECRET), ("gpt", "x"), ("human", SECRET))),
                         "ends with a prompt, not an answer"),
    "late_system_prompt": (_line(_conv(("human", SECRET), ("system", SECRET), ("gpt", "x"))),
                           "turn 2: a system prompt is only allowed as the first turn"),
    "messages_without_role": (_line({"messages": [{"content": SECRET}]}), "turn 1: missing key 'role'"),
    "alpaca_without_output": (_line({"instruction": SECRET}), "missing key 'output'"),
    "special_token_text": (_line(_conv(("human", SECRET), ("gpt", f"{SECRET}</s> and more"))),
                           "contains the text of the special token '</s>'"),
    # issue 19: records that used to be kept silently
    "empty_answer": (_line(_conv(("human", SECRET), ("gpt", " \n"))), "turn 2: empty answer"),
    "empty_prompt": (_line({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": SECRET}]}),
                     "turn 1: empty prompt"),
    "alpaca_empty_output": (_line({"instruction": SECRET, "input": "", "output": ""}), "empty answer ('output')"),
    "two_formats": (_line({**_conv(("human", SECRET), ("gpt", "x")),
                           "messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": "y"}]}),
                    "both 'conversations' and 'messages' keys: one conversation format per record"),
}


def _write_input(tmp_path, bad: bytes):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD[0] + GOOD[1] + bad + GOOD[2] + GOOD[3])
    return path


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def _run(path, tmp_path, spm_model, *extra):
    return melama(["preprocess-sft", "--input", str(path), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-model", spm_model, "--max-document-bytes", "4096", "--no-progress", *extra])


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_record_stops_with_file_line_and_no_output(case, tmp_path, spm_model, capsys):
    bad, reason = HOSTILE[case]
    path = _write_input(tmp_path, bad)
    assert _run(path, tmp_path, spm_model, "--workers", "2") == 2
    err = capsys.readouterr().err
    assert f"{path}:3: " in err and reason in err, err
    assert SECRET not in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_record_skipped_and_counted(case, tmp_path, spm_model, capsys):
    path = _write_input(tmp_path, HOSTILE[case][0])
    assert _run(path, tmp_path, spm_model, "--on-error", "skip", "--workers", "1") == 0
    out, err = capsys.readouterr()
    assert "skipped:   1 " in out and SECRET not in out + err
    assert len(read_sft(tmp_path / "out_sft_document")) == 4


@pytest.mark.parametrize("failing", ["marker", "tokens"])
def test_failure_while_publishing_leaves_nothing_usable(failing, tmp_path, spm_model, monkeypatch):
    # an earlier run's complete output, then a run that fails half-way through publishing its own
    path = _write_input(tmp_path, GOOD[0])
    preprocess_sft([str(path)], str(tmp_path / "out"), spm_model, progress=False)
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith(".sft.json" if failing == "marker" else "document.idx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", replace)
    monkeypatch.setattr("melama_mcore.data.indexed_writer.os.replace", replace)
    with pytest.raises(DataError, match="No space left on device; nothing was written"):
        preprocess_sft([str(path)], str(tmp_path / "out"), spm_model, progress=False, overwrite=True)
    prefix = tmp_path / "out_sft_document"
    assert not is_sft_prefix(prefix) and not os.path.exists(f"{prefix}.idx")
    assert [n for n in _leftovers(tmp_path) if n.endswith((".idx", ".json", ".incomplete"))] == []


@pytest.mark.slow
def test_sigterm_mid_run_cleans_up(tmp_path, spm_model):
    from melama_mcore.demo.instructions import write_synthetic_instructions

    paths = write_synthetic_instructions(tmp_path / "syn", samples=4000)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        for _ in range(20):
            for p in paths.values():
                f.write(p.read_bytes())
    cmd = [sys.executable, "-m", "melama_mcore.cli", "preprocess-sft", "--input", str(big), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-model", spm_model, "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    partial = tmp_path / "out_sft_document.bin.incomplete"
    deadline = time.time() + 60
    while not (partial.exists() and partial.stat().st_size > 50_000):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err
    assert _leftovers(tmp_path) == []


# ----- issue 19: an empty prefix where instruction data is read; a template failing on one record -----

def _empty_and_good(tmp_path, spm_model) -> list[dict]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = _write_input(tmp_path, GOOD[0])
    blend = []
    for name, src in (("good", good), ("empty", empty)):
        prefix = preprocess_sft([str(src)], str(tmp_path / name), spm_model, seq_length=128,
                                truncation="truncate", progress=False).prefix
        blend.append({"name": name, "weight": 1, "train": [prefix]})
    return blend


def test_an_empty_prefix_is_refused_by_blend_report_in_one_line(tmp_path, spm_model, capsys, monkeypatch):
    # It used to reach megatron's reader: "cannot mmap an empty file" and two "Exception ignored".
    import gc

    import yaml

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    blend = tmp_path / "blend.yaml"
    blend.write_text(yaml.safe_dump(_empty_and_good(tmp_path, spm_model)))
    assert melama(["blend-report", str(blend), "--samples", "10", "--seq-length", "128"]) == 2
    gc.collect()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and unraisable == [], (err, unraisable)
    assert f"error: {tmp_path / 'empty_sft_document'}: an empty instruction dataset (0 samples" in err
    assert "remove it from the blend" in err


@pytest.mark.slow
def test_training_beside_an_empty_prefix_stops_in_one_line(tmp_path, spm_model):
    from trunk_fixtures import run_train

    blend = _empty_and_good(tmp_path, spm_model)
    result = run_train(tmp_path / "out", [f"data.tokenizer={spm_model}", f"data.blend={json.dumps(blend)}",
                                          "training.seq_length=128"], check=False)
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stdout.splitlines() if "error" in line.lower() or "exception" in line.lower()]
    assert errors == [f"error: {tmp_path / 'empty_sft_document'}: an empty instruction dataset (0 samples: "
                      "preprocess-sft found no usable conversation in its input); remove it from the blend"], \
        result.stdout
    assert "Traceback" not in result.stdout and "step 1" not in result.stdout


def test_a_template_failing_on_one_record_says_why_and_where(tmp_path, spm_model, capsys):
    # Issue 19: the message and the template's line, not only the exception's class; never record text.
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}\n"
                        "{% if 'question 1' in m.content %}{{ raise_exception('no question 1 here') }}{% endif %}\n"
                        "{% if 'question 2' in m.content %}{{ raise_exception('refused: ' + m.content) }}{% endif %}\n"
                        "{% if m.role == 'user' %}{{ m.content }}{% else %}{{ ' ' + m.content + eos_token }}{% endif %}"
                        "{% endfor %}")
    path = _write_input(tmp_path, GOOD[3])
    assert _run(path, tmp_path, spm_model, "--chat-template", str(template), "--workers", "1") == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}:2: the chat template failed on this conversation (TemplateError, line 2: "
                   "no question 1 here) (use --on-error skip to skip such records; nothing was written)\n")
    assert _run(path, tmp_path, spm_model, "--chat-template", str(template), "--on-error", "skip") == 0
    out, err = capsys.readouterr()
    assert "skipped:   2 (2 the chat template failed on this conversation)" in out and SECRET not in out + err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ bos_token }}\n{% for m in messages %}{{ m.content }\n{% endfor %}")
    assert _run(path, tmp_path, spm_model, "--chat-template", str(broken)) == 2
    assert "(TemplateSyntaxError, line 2: unexpected '}')" in capsys.readouterr().err
