"""`melama preprocess-sft`: token ids equal the tokenizer applied to the template's text, written by
hand here from each format's specification; the loss mask covers exactly the answers and their EOS;
drops, truncation and the on-disk format; `blend-report` on instruction prefixes."""

from __future__ import annotations

import filecmp
import gzip
import json
import re

import numpy as np
import pytest

from sft_fixtures import (B_SYS, E_SYS, LLAMA2_JINJA, LLAMA2_JINJA_PLAIN, RECORDS, read_sft, trained_runs,
                          write_jsonl)
from melama_mcore.cli import main as melama
from melama_mcore.data.sft.indexed import is_sft_blend, is_sft_prefix, read_marker, sft_prefix, verify_sft_prefix
from melama_mcore.data.sft.preprocess import preprocess_sft
from melama_mcore.errors import ConfigError, DataError


def me_llama_text(system, turns):
    return "<s>" + (f"{system}\n\n" if system else "") + "".join(
        f"Human: \n{p}\n\nAssistant: \n{a}</s>" for p, a in turns)


def llama2_chat_text(system, turns):
    out = ""
    for i, (p, a) in enumerate(turns):
        if i == 0 and system:
            p = B_SYS + system + E_SYS + p
        out += f"<s>[INST] {p.strip()} [/INST] {a.strip()} </s>"
    return out


def sentencepiece_ids(sp, text):
    """What a sentencepiece model makes of rendered text: <s>/</s> as BOS/EOS, every run between
    them encoded on its own (as Meta's LLaMA-2 chat code encodes each turn)."""
    special = {"<s>": [sp.bos_id()], "</s>": [sp.eos_id()]}
    return [i for piece in re.split(r"(<s>|</s>)", text) if piece for i in special.get(piece) or sp.encode(piece)]


@pytest.mark.parametrize("template, render", [("me-llama", me_llama_text), ("llama2-chat", llama2_chat_text),
                                              ("FILE.jinja", llama2_chat_text)])
def test_ids_and_masks_equal_the_template_applied_directly(template, render, tmp_path, spm_model, sp):
    if template == "FILE.jinja":  # a LLaMA-2-chat Jinja template without {% generation %}: answers found turn by turn
        template = str(tmp_path / "llama2.jinja")
        (tmp_path / "llama2.jinja").write_text(LLAMA2_JINJA_PLAIN)
    src = write_jsonl(tmp_path / "in.jsonl", [r for r, _, _ in RECORDS])
    args = ["preprocess-sft", "--input", src, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            spm_model, "--no-progress", "--workers", "2"]
    assert melama(args if template == "me-llama" else args + ["--chat-template", template]) == 0
    samples = read_sft(tmp_path / "out_sft_document")
    assert len(samples) == len(RECORDS)
    for (ids, mask), (_, system, turns) in zip(samples, RECORDS):
        assert ids == sentencepiece_ids(sp, render(system, turns))
        # trained: each answer (as the template writes it) followed by EOS, and nothing else
        runs = trained_runs(ids, mask)
        assert [run[-1] for run in runs] == [sp.eos_id()] * len(turns)
        assert [sp.decode(run[:-1]).strip() for run in runs] == [a.strip() for _, a in turns]
        assert mask[0] == 0


def test_multi_turn_masks_every_prompt(tmp_path, spm_model, sp):
    # every human turn (and the template text around it) untrained: untrained runs decode to prompts
    record, _, turns = RECORDS[0]
    src = write_jsonl(tmp_path / "in.jsonl", [record])
    preprocess_sft([src], str(tmp_path / "out"), spm_model, progress=False)
    [(ids, mask)] = read_sft(tmp_path / "out_sft_document")
    untrained = [sp.decode([t for t, m in zip(run_ids, run_mask) if not m])
                 for run_ids, run_mask in [(ids, mask)]][0]
    for prompt, answer in turns:
        assert prompt in untrained and answer not in untrained
    assert sum(mask) == sum(len(run) for run in trained_runs(ids, mask))


def test_train_on_all_and_system_prompt_option(tmp_path, spm_model, sp):
    record, _, turns = RECORDS[3]
    src = write_jsonl(tmp_path / "in.jsonl", [record])
    preprocess_sft([src], str(tmp_path / "out"), spm_model, train_on_all=True, system_prompt="Be brief.",
                   progress=False)
    [(ids, mask)] = read_sft(tmp_path / "out_sft_document")
    assert ids == sentencepiece_ids(sp, me_llama_text("Be brief.", turns)) and set(mask) == {1}
    assert read_marker(tmp_path / "out_sft_document")["train_on_all"] is True


def test_hf_template_equals_transformers_apply_chat_template(tmp_path, hf_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    src = write_jsonl(tmp_path / "in.jsonl", [r for r, _, _ in RECORDS])
    jinja = tmp_path / "llama2.jinja"
    jinja.write_text(LLAMA2_JINJA)  # the same template with {% generation %} blocks
    for name, template in (("hf", "hf"), ("file", str(jinja))):
        summary = preprocess_sft([src], str(tmp_path / name), hf_tokenizer_dir, chat_template=template,
                                 progress=False)
        assert summary.samples == len(RECORDS)
        for (ids, mask), (_, system, turns) in zip(read_sft(tmp_path / f"{name}_sft_document"), RECORDS):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                m for p, a in turns for m in ({"role": "user", "content": p}, {"role": "assistant", "content": a})]
            # transformers' own rendering and tokenisation, and its own assistant mask ({% generation %})
            reference = hf.apply_chat_template(messages, chat_template=LLAMA2_JINJA, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            assert ids == reference["input_ids"]
            assert mask == reference["assistant_masks"]
    # the template as it travels with the data: its name, its text, no system prompt
    assert read_marker(tmp_path / "hf_sft_document")["template"] == {"name": "hf", "jinja": LLAMA2_JINJA_PLAIN,
                                                                     "system_prompt": None}
    assert read_marker(tmp_path / "file_sft_document")["template"] == {"name": str(jinja), "jinja": LLAMA2_JINJA,
                                                                       "system_prompt": None}


def test_template_errors_are_one_line(tmp_path, spm_model, hf_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0][0]])
    base = ["preprocess-sft", "--input", src, "--output-prefix", str(tmp_path / "o"), "--no-progress"]
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    cases = [(["--tokenizer-model", spm_model, "--chat-template", "hf"], "is a sentencepiece model"),
             (["--tokenizer-model", spm_model, "--chat-template", "nope"], "not one of me-llama, llama2-chat, hf"),
             (["--tokenizer-model", spm_model, "--chat-template", str(bad)], "fails on a two-turn test conversation"),
             (["--tokenizer-model", hf_tokenizer_dir, "--seq-length", "0"], "--seq-length must be at least 1")]
    for extra, message in cases:
        assert melama(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("o*"))


def test_too_long_dropped_or_truncated_and_counted(tmp_path, spm_model, sp):
    long_answer = "The patient was admitted with chest pain and treated. " * 8
    records = [{"instruction": "Short?", "output": "Yes."}, {"instruction": "Write the letter.", "output": long_answer},
               {"instruction": "Tell me everything. " * 12, "output": "Fine."}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    full = [sentencepiece_ids(sp, me_llama_text(None, [(r["instruction"], r["output"])])) for r in records]
    seq = 40
    assert len(full[0]) - 1 <= seq < len(full[1]) - 1 and len(full[2]) - 1 > seq
    dropped = preprocess_sft([src], str(tmp_path / "drop"), spm_model, seq_length=seq, progress=False)
    assert (dropped.samples, dropped.too_long, dropped.truncated, dropped.no_answer) == (1, 2, 0, 0)
    assert [ids for ids, _ in read_sft(tmp_path / "drop_sft_document")] == [full[0]]
    cut = preprocess_sft([src], str(tmp_path / "cut"), spm_model, seq_length=seq, truncation="truncate",
                         progress=False)
    # the third keeps only prompt tokens within the sequence: dropped as having no answer token
    assert (cut.samples, cut.too_long, cut.truncated, cut.no_answer) == (2, 0, 2, 1)
    samples = read_sft(tmp_path / "cut_sft_document")
    assert samples[1][0] == full[1][:seq + 1] and sum(samples[1][1]) > 0
    meta = read_marker(tmp_path / "cut_sft_document")
    assert meta["counts"]["truncated"] == 2 and meta["counts"]["no_answer"] == 1 and meta["seq_length"] == seq


def test_workers_compressed_inputs_and_format(tmp_path, corpus, spm_model):
    from melama_mcore.demo.instructions import write_synthetic_instructions

    paths = write_synthetic_instructions(tmp_path / "syn", samples=200, seed=1)
    gz = tmp_path / "chat.jsonl.gz"
    gz.write_bytes(gzip.compress(paths["patient_chat"].read_bytes()))
    inputs = [str(paths["medical_qa"]), str(gz), str(tmp_path / "syn" / "[ce]*.jsonl")]
    one = preprocess_sft(inputs, str(tmp_path / "w1"), spm_model, workers=1, progress=False)
    two = preprocess_sft(inputs, str(tmp_path / "w2"), spm_model, workers=2, progress=False)
    assert one.samples == two.samples == 200 and one.skipped == 0
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert filecmp.cmp(f"{tmp_path}/w1_sft_document{suffix}", f"{tmp_path}/w2_sft_document{suffix}", shallow=False)
    prefix = sft_prefix(str(tmp_path / "w1"))
    meta = verify_sft_prefix(prefix, 400)
    assert meta["counts"]["samples"] == 200 and meta["counts"]["trained_tokens"] == one.trained_tokens
    assert is_sft_prefix(prefix) and is_sft_prefix(prefix + ".bin") and not is_sft_prefix(tmp_path / "w1")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix).index.dtype == np.uint16
    assert IndexedDataset(f"{prefix}_loss_mask").index.dtype == np.uint8


def _blend(path, sources) -> str:
    path.write_text("sources:\n" + "".join(f"  - {{name: {n}, weight: {w}, train: {p}}}\n" for n, w, p in sources))
    return str(path)


def _ffd_bins(sizes, capacity) -> int:
    """First-fit-decreasing, the textbook loop."""
    bins = []
    for size in sorted(sizes, reverse=True):
        for i, free in enumerate(bins):
            if free >= size:
                bins[i] -= size
                break
        else:
            bins.append(capacity - size)
    return len(bins)


def test_blend_report_on_sft_prefixes(tmp_path, spm_model, corpus, capsys):
    from melama_mcore.demo.instructions import write_synthetic_instructions

    paths = write_synthetic_instructions(tmp_path / "syn", samples=300, seed=2)
    preprocess_sft([str(paths["medical_qa"])], str(tmp_path / "qa"), spm_model, seq_length=512, progress=False)
    preprocess_sft([str(paths["clinical_tasks"])], str(tmp_path / "tasks"), spm_model, seq_length=512,
                   progress=False)
    qa, tasks = (f"{tmp_path}/{n}_sft_document" for n in ("qa", "tasks"))
    blend = _blend(tmp_path / "sft.yaml", [("qa", 1, qa), ("tasks", 3, tasks)])
    assert melama(["blend-report", blend, "--samples", "200", "--seq-length", "512"]) == 0
    out = capsys.readouterr().out
    for name, prefix, share in (("qa", qa, 0.25), ("tasks", tasks, 0.75)):
        lengths = [len(ids) - 1 for ids, _ in read_sft(prefix)]
        per_epoch = _ffd_bins(lengths, 512)
        row = next(line for line in out.splitlines() if line.startswith(name + " ")).split()
        assert row[3] == f"{len(lengths):,}" and row[4] == f"{per_epoch:,}"
        assert row[6] == f"{round(share * 200):,}" and row[-1] == f"{share * 200 / per_epoch:.2f}"
    # a blend mixing instruction and pre-training data is refused
    from melama_mcore.data.blend import load_blend
    from melama_mcore.data.preprocess import preprocess

    preprocess([str(corpus["general"])], str(tmp_path / "pt"), spm_model, progress=False)
    mixed = _blend(tmp_path / "mixed.yaml", [("qa", 1, qa), ("general", 1, f"{tmp_path}/pt_text_document")])
    with pytest.raises(ConfigError, match="mixes instruction data"):
        is_sft_blend(load_blend(mixed))
    assert melama(["blend-report", mixed, "--samples", "10", "--seq-length", "512"]) == 2
    assert "mixes instruction data" in capsys.readouterr().err
    assert melama(["blend-report", blend, "--samples", "10", "--seq-length", "64"]) == 2
    assert "--seq-length 64" in capsys.readouterr().err


def test_stale_or_mixed_files_are_refused(tmp_path, spm_model):
    src = write_jsonl(tmp_path / "in.jsonl", [r for r, _, _ in RECORDS])
    preprocess_sft([src], str(tmp_path / "a"), spm_model, progress=False)
    preprocess_sft([src], str(tmp_path / "b"), spm_model, chat_template="llama2-chat", progress=False)
    prefix = f"{tmp_path}/a_sft_document"
    import os

    os.replace(f"{tmp_path}/b_sft_document_loss_mask.bin", f"{prefix}_loss_mask.bin")
    os.replace(f"{tmp_path}/b_sft_document_loss_mask.idx", f"{prefix}_loss_mask.idx")
    with pytest.raises(DataError, match="disagree"):
        verify_sft_prefix(prefix)
    marker = tmp_path / "b_sft_document.sft.json"
    marker.write_text(json.dumps({"format": "melama-sft", "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        verify_sft_prefix(tmp_path / "b_sft_document")
