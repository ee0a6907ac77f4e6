"""Preprocessing: the ids written are the tokenizer's ids, in order, in Megatron-LM's exact format."""

from __future__ import annotations

import errno
import filecmp
import gzip
import json

import numpy as np
import pytest
import torch
import zstandard

from data_fixtures import read_documents, read_texts
from melama_mcore.cli import main as melama
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.tokenizer import load_tokenizer


def test_tokenizer_wrapper_matches_sentencepiece(spm_model, sp, corpus):
    tok = load_tokenizer(spm_model)
    texts = read_texts(corpus["clinical"])[:20]
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert tok.encode(texts[0]) == sp.encode(texts[0])
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (sp.vocab_size(), sp.bos_id(), sp.eos_id(), None)
    assert tok.decode(tok.encode(texts[0])) == sp.decode(sp.encode(texts[0]))


def test_llama_style_tokenizer_settings(sp):
    # split digits: every digit its own piece; byte fallback: unseen characters still round-trip.
    pieces = [sp.id_to_piece(i) for i in sp.encode("2024")]
    assert [p.lstrip("\u2581") for p in pieces if p != "\u2581"] == ["2", "0", "2", "4"]
    text = "dose \u00e6\u20ac\U0001f600 given"
    assert sp.decode(sp.encode(text)) == text
    assert sp.unk_id() not in sp.encode(text)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)


@pytest.mark.parametrize("workers", [1, 2])
def test_ids_equal_tokenizer_per_document_across_inputs(tmp_path, corpus, spm_model, sp, workers):
    # Three inputs (plain, gzip, zstd) into one output, read back by megatron-core's IndexedDataset.
    plain = corpus["biomedical"]
    gz = tmp_path / "clinical.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus["clinical"].read_bytes()))
    zst = tmp_path / "general.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(corpus["general"].read_bytes()))
    summary = preprocess([str(plain), str(gz), str(zst)], str(tmp_path / "out"), spm_model,
                         workers=workers, progress=False)
    texts = read_texts(plain) + read_texts(corpus["clinical"]) + read_texts(corpus["general"])
    expected = [[sp.bos_id()] + sp.encode(t) for t in texts]
    assert read_documents(tmp_path / "out_text_document") == expected
    assert summary.documents == len(texts) and summary.tokens == sum(map(len, expected))


def test_append_eod_output_is_byte_identical_to_megatron_builder(tmp_path, corpus, spm_model, sp):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    inputs = [str(corpus["biomedical"]), str(corpus["clinical"])]
    rc = melama(["preprocess", "--input", *inputs, "--output-prefix", str(tmp_path / "ours"),
                 "--tokenizer-model", spm_model, "--append-eod", "--no-prepend-bos", "--workers", "2",
                 "--no-progress"])
    assert rc == 0
    # What Megatron-LM's tools/preprocess_data.py --append-eod does, with megatron-core's builder.
    reference = str(tmp_path / "reference")
    builder = IndexedDatasetBuilder(reference + ".bin", dtype=DType.optimal_dtype(sp.vocab_size()))
    for path in inputs:
        for text in read_texts(path):
            builder.add_item(torch.IntTensor(sp.encode(text) + [sp.eos_id()]))
            builder.end_document()
    builder.finalize(reference + ".idx")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"ours_text_document{ext}", reference + ext, shallow=False), ext


def test_one_output_pair_per_json_key(tmp_path, spm_model, sp):
    rows = [{"title": f"Case {i}", "abstract": f"Patient {i} received {i * 3} mg.", "id": i} for i in range(50)]
    src = tmp_path / "papers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess([str(src)], str(tmp_path / "pp"), spm_model, json_keys=["title", "abstract"], progress=False)
    for key in ("title", "abstract"):
        assert read_documents(tmp_path / f"pp_{key}_document") == [[1] + sp.encode(r[key]) for r in rows]


def test_several_json_keys_are_published_all_or_none(tmp_path, spm_model, monkeypatch, capsys):
    """Issue 19: a failure while finishing a later key's pair (here the disk fills up while its index
    is written) left the first key's pair published. Every pair is now complete on disk before any
    is renamed into place."""
    from melama_mcore.data.indexed_writer import IndexedWriter

    src = tmp_path / "papers.jsonl"
    src.write_text("".join(json.dumps({"title": f"Case {i}", "abstract": f"Dose {i} mg."}) + "\n" for i in range(20)))
    write_index, indexed = IndexedWriter._write_index, []

    def disk_full_at_the_second_index(writer):
        indexed.append(writer.prefix)
        if len(indexed) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", writer.idx_tmp)
        write_index(writer)

    monkeypatch.setattr(IndexedWriter, "_write_index", disk_full_at_the_second_index)
    assert melama(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "pp"), "--tokenizer-model",
                   spm_model, "--json-keys", "title", "abstract", "--workers", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'pp_abstract_document.idx.incomplete'}: No space left on "
                                       "device; nothing was written\n")
    assert len(indexed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["papers.jsonl"]


def test_text_inputs_per_file_and_per_block(tmp_path, spm_model, sp):
    notes = ["First note.\nSecond line.", "Another document\nwith two lines.", "Third."]
    files = []
    for i, note in enumerate(notes):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(note + "\n")
    preprocess([str(f) for f in files], str(tmp_path / "files"), spm_model, progress=False)
    assert read_documents(tmp_path / "files_text_document") == [[1] + sp.encode(n) for n in notes]

    blocks = tmp_path / "blocks.txt.gz"
    blocks.write_bytes(gzip.compress(("\n\n\n".join(notes) + "\n\n").encode()))
    preprocess([str(blocks)], str(tmp_path / "blocks"), spm_model, text_unit="block", progress=False)
    assert read_documents(tmp_path / "blocks_text_document") == [[1] + sp.encode(n) for n in notes]


def test_empty_documents_are_counted_not_written(tmp_path, spm_model, sp):
    src = tmp_path / "e.jsonl"
    src.write_text('{"text": "kept one"}\n{"text": ""}\n{"text": "   "}\n\n{"text": "kept two"}\n')
    summary = preprocess([str(src)], str(tmp_path / "e"), spm_model, progress=False)
    assert read_documents(tmp_path / "e_text_document") == [[1] + sp.encode("kept one"), [1] + sp.encode("kept two")]
    assert (summary.documents, summary.empty, summary.skipped) == (2, 3, 0)


def test_uint16_for_small_vocab(tmp_path, corpus, spm_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    preprocess([str(corpus["general"])], str(tmp_path / "g"), spm_model, progress=False)
    assert IndexedDataset(str(tmp_path / "g_text_document")).index.dtype == np.uint16


def test_train_tokenizer_cli(tmp_path, corpus):
    import sentencepiece

    rc = melama(["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix",
                 str(tmp_path / "t"), "--vocab-size", "450"])
    assert rc == 0
    assert sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "t.model")).vocab_size() == 450
    assert melama(["train-tokenizer", "--input", str(corpus["clinical"]), "--model-prefix",
                   str(tmp_path / "u"), "--vocab-size", "100"]) == 2
    assert not (tmp_path / "u.model").exists()
