"""Issue 19.3: data made with one tokenizer is refused under another (same or smaller vocabulary, where
the token-range checks cannot see it), for pre-training and instruction data, with both tokenizers
named; compared by the vocabulary's content, as checkpoints compare it, never by path; an explicit
override for a user who means it."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import torch.distributed as dist

from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.cli import main as melama
from melama_mcore.data.blend import load_blend
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.provenance import check_data_tokenizer, recorded_tokenizer
from melama_mcore.data.sft.preprocess import preprocess_sft
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import DataError
from sft_fixtures import RECORDS, write_jsonl
from trunk_fixtures import TINY


@pytest.fixture(scope="module")
def made_with_spm(spm_model, corpus, tmp_path_factory) -> dict:
    """A pre-training prefix per corpus source and one instruction prefix, all made with the 400-piece
    test tokenizer."""
    root = tmp_path_factory.mktemp("made_with_spm")
    blend = []
    for name, path in corpus.items():
        preprocess([str(path)], str(root / name), spm_model, append_eod=True, workers=1, progress=False)
        blend.append({"name": name, "weight": 1, "train": [str(root / f"{name}_text_document")]})
    src = write_jsonl(root / "sft.jsonl", [r for r, _, _ in RECORDS] * 20)
    sft = preprocess_sft([src], str(root / "chat"), spm_model, seq_length=32, truncation="truncate", workers=1,
                         progress=False)
    return {"blend": blend, "sft_blend": [{"name": "chat", "weight": 1, "train": [sft.prefix]}]}


def test_the_vocabulary_digest_is_the_checkpoints_and_reads_the_pieces(spm_model, sp, hf_tokenizer_dir):
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    reference = hashlib.sha256("\0".join(pieces).encode()).hexdigest()
    tok = load_tokenizer(spm_model)
    assert tok.vocab_sha256 == reference == model_identity(None, tok)["tokenizer"]["vocab_sha256"]
    hf = load_tokenizer(hf_tokenizer_dir)  # the same model as a Hugging Face folder: the same vocabulary
    assert hf.vocab_sha256 == model_identity(None, hf)["tokenizer"]["vocab_sha256"] == reference


def test_markers_record_the_tokenizer(made_with_spm, spm_model):
    tok = load_tokenizer(spm_model)
    for entry in made_with_spm["blend"] + made_with_spm["sft_blend"]:
        assert recorded_tokenizer(entry["train"][0]) == {"path": spm_model, "vocab_size": 400,
                                                         "vocab_sha256": tok.vocab_sha256, "bos_id": 1, "eos_id": 2}


@pytest.mark.parametrize("data", ["blend", "sft_blend"])
def test_a_copy_of_the_same_tokenizer_elsewhere_is_accepted(data, made_with_spm, spm_model, tmp_path):
    copy = tmp_path / "elsewhere.model"
    shutil.copyfile(spm_model, copy)
    check_data_tokenizer(load_blend(made_with_spm[data]), str(copy))


@pytest.mark.parametrize("data", ["blend", "sft_blend"])
def test_other_spm_model_is_refused_naming_both(data, made_with_spm, spm_model,
                                                           other_spm_model):
    with pytest.raises(DataError) as err:
        check_data_tokenizer(load_blend(made_with_spm[data]), other_spm_model)
    message = str(err.value)
    assert f"tokenised with {spm_model} (400 tokens)" in message
    assert f"data.tokenizer is {other_spm_model} (400 tokens, another vocabulary)" in message
    assert "data.allow_tokenizer_mismatch=true" in message and "\n" not in message


def test_the_override_trains_anyway_with_one_warning(made_with_spm, other_spm_model, caplog):
    with caplog.at_level(logging.WARNING):
        check_data_tokenizer(load_blend(made_with_spm["blend"]), other_spm_model, allow_mismatch=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training on it anyway" in warnings[0].getMessage()


@pytest.mark.parametrize("data", ["blend", "sft_blend"])
def test_training_under_a_larger_tokenizer_is_refused_before_it_starts(data, made_with_spm, tiny_data, spm_model,
                                                                     tmp_path, capsys):
    # The trunk fixture's 512-piece tokenizer: every id of the 400-piece data is in range, so only the
    # recorded tokenizer tells the data apart.
    import json

    rc = melama(["train", f"output_dir={tmp_path / 'out'}", *TINY, f"data.tokenizer={tiny_data['tokenizer']}",
                 f"data.blend={json.dumps(made_with_spm[data])}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"tokenised with {spm_model} (400 tokens), but data.tokenizer is {tiny_data['tokenizer']} (512 tokens)" \
        in err
    assert not dist.is_initialized()  # refused before any process group
