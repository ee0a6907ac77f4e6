"""One huge document (issue 14.7): encoded in pieces cut where no token can straddle the cut, with the
ids sentencepiece gives the whole text, and memory that no longer grows ~50x with the document."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from data_fixtures import read_documents, read_texts
from melama_mcore.cli import main as melama
from melama_mcore.data import tokenizer as tokenizer_module
from melama_mcore.data.tokenizer import load_tokenizer

SECRET = "Jane Roe MRN 0047-1123 diagnosed"  # stands for patient text: must never be printed
# Whitespace and characters around which a cut could go wrong: runs of spaces, tabs, newlines, Unicode
# spaces (U+3000, no-break space), accents, CJK and an emoji (byte fallback), digits (split one by one).
TEXTURE = ["  ", "\n", "\t", " \n ", "\u3000", "\u00a0", " caf\u00e9 ", " \u80ba\u708e ", " \U0001f600 ",
           " 2024-11-03 ", "   ", " a ", " . "]


def _long_text(corpus, chars: int) -> str:
    texts = read_texts(corpus["clinical"]) + read_texts(corpus["general"])
    parts, size = [], 0
    for i, text in enumerate(itertools.cycle(texts)):
        piece = text + TEXTURE[i % len(TEXTURE)]
        parts.append(piece)
        size += len(piece)
        if size >= chars:
            return "".join(parts)[:chars]


def _ids(tok, text):
    pieces = list(tok.iter_encode(text))
    return list(itertools.chain.from_iterable(pieces)), len(pieces)


def test_pieces_give_the_ids_of_the_whole_text(corpus, spm_model, sp, monkeypatch):
    # A small piece size cuts ~300 times, at every kind of neighbourhood in TEXTURE.
    monkeypatch.setattr(tokenizer_module, "LONG_TEXT_CHARS", 997)
    text = _long_text(corpus, 300_000)
    ids, pieces = _ids(load_tokenizer(spm_model), text)
    assert pieces > 250
    assert ids == sp.encode(text)  # the reference: sentencepiece on the whole text


_SPACE = "\u2581"
HF_VARIANTS = {  # tokenizer.json changes -> whether a long text may be cut
    "metaspace": ({}, True),  # what transformers writes for LLaMA's tokenizer.model today
    "legacy_normaliser": ({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": _SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}]},
        "pre_tokenizer": None}, True),  # older LLaMA tokenizer.json files
    "whitespace_split": ({"pre_tokenizer": {"type": "WhitespaceSplit"}}, False),  # spaces not kept as U+2581
    "byte_level": ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True}}, False),
}


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hugging_face_folders_are_cut_only_when_safe(variant, corpus, hf_tokenizer_dir, tmp_path, monkeypatch):
    # Issue 19: a Hugging Face folder encoded an 80 MB document whole (3.8 GB, a quarter of the usual
    # rate). The reference: the same tokenizer.json, through transformers, on the whole text.
    from transformers import AutoTokenizer

    changes, cuts = HF_VARIANTS[variant]
    spec = json.loads(AutoTokenizer.from_pretrained(hf_tokenizer_dir, local_files_only=True)
                      .backend_tokenizer.to_str())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, **changes}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    monkeypatch.setattr(tokenizer_module, "LONG_TEXT_CHARS", 997)
    text = _long_text(corpus, 60_000)
    ids, pieces = _ids(load_tokenizer(str(tmp_path)), text)
    assert (pieces > 1) == cuts
    assert ids == reference(text, add_special_tokens=False)["input_ids"]


def _train(corpus, tmp_path, name, **settings):
    import sentencepiece

    from melama_mcore.data.train_tokenizer import LLAMA_TRAINER_SETTINGS

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(line for text in read_texts(corpus["biomedical"]) for line in text.splitlines()))
    sentencepiece.SentencePieceTrainer.train(input=str(lines), model_prefix=str(tmp_path / name), vocab_size=400,
                                             minloglevel=2, **{**LLAMA_TRAINER_SETTINGS, **settings})
    return str(tmp_path / f"{name}.model"), sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / f"{name}.model"))


@pytest.mark.parametrize("name, settings, cuts", [
    ("no_dummy_prefix", dict(add_dummy_prefix=False), True),  # cut, keeping the space in the next piece
    ("suffix_spaces", dict(treat_whitespace_as_suffix=True), False),  # "word▁" pieces: never cut
    ("extra_whitespace_removed", dict(add_dummy_prefix=False, remove_extra_whitespaces=True), False),
    ("nfkc", dict(normalization_rule_name="nmt_nfkc"), False),
])
def test_models_whose_ids_a_cut_could_change_are_cut_only_when_safe(name, settings, cuts, corpus, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(tokenizer_module, "LONG_TEXT_CHARS", 997)
    model, reference = _train(corpus, tmp_path, name, **settings)
    text = _long_text(corpus, 60_000)
    ids, pieces = _ids(load_tokenizer(model), text)
    assert (pieces > 1) == cuts
    assert ids == reference.encode(text)


def test_one_long_document_through_the_cli(tmp_path, corpus, spm_model, sp, capsys):
    # The real piece size (16 Ki characters): a 300 K-character document between two ordinary ones.
    long_text = SECRET + " " + _long_text(corpus, 300_000)
    texts = [f"{SECRET} first", long_text, f"{SECRET} last"]
    src = tmp_path / "one.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rc = melama(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
                 spm_model, "--max-document-bytes", "4000000", "--append-eod", "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and SECRET not in out + err
    assert read_documents(tmp_path / "out_text_document") == [[1] + sp.encode(t) + [2] for t in texts]


def _peak_rss_mib(tmp_path, src, spm_model) -> float:
    """Largest resident set of `melama preprocess` or its worker (getrusage of the waited-for tree)."""
    script = ("import resource, subprocess, sys\n"
              "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = [sys.executable, "-c", script, sys.executable, "-m", "melama_mcore.cli", "preprocess", "--input", str(src),
           "--output-prefix", str(tmp_path / src.stem), "--tokenizer-model", spm_model, "--workers", "1",
           "--max-document-bytes", "100000000", "--no-progress"]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) / 1024


@pytest.mark.slow
def test_memory_no_longer_grows_50x_with_one_document(tmp_path, corpus, spm_model):
    # ASCII text (1 byte per character in a Python str). Measured: the tokenizer's memory for one call
    # (a few MiB for 16 pieces of 16 Ki characters; ~50 MiB with the earlier 1 Mi pieces) + ~6-8x the
    # document's size, above the process's own ~40 MiB (8 MB: +117 MiB with 1 Mi pieces); before the
    # pieces ~50x (8 MB: +396 MiB; 200 MB: 10.4 GB).
    size = 8_000_000
    ascii_text = " ".join(read_texts(corpus["clinical"]) + read_texts(corpus["general"]))
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text(json.dumps({"text": (ascii_text * (size // len(ascii_text) + 1))[:size]}) + "\n")
    small.write_text(json.dumps({"text": "one short note"}) + "\n")
    grown = _peak_rss_mib(tmp_path, big, spm_model) - _peak_rss_mib(tmp_path, small, spm_model)
    limit = 64 + 12 * size / 2**20
    assert grown < limit, f"{grown:.0f} MiB above the baseline for a {size / 1e6:.0f} MB document (limit {limit:.0f})"
