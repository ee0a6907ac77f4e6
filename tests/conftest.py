"""Fixtures shared by the test modules (built once per session), found by pytest from here:
a synthetic corpus and tokenizer (data tests), tiny three-domain indexed datasets (training tests),
a Hugging Face tokenizer folder with a chat template (instruction-data tests). Plain helpers live
in data_fixtures.py, trunk_fixtures.py and sft_fixtures.py."""

from __future__ import annotations

import json
import shutil

import pytest

from data_fixtures import VOCAB_SIZE
from melama_mcore.demo.corpus import write_demo_corpus
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.train_tokenizer import train_sentencepiece
from sft_fixtures import LLAMA2_JINJA_PLAIN


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{source name: path of a JSONL file with 300 documents}."""
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), docs_per_source=300, seed=0)


@pytest.fixture(scope="session")
def spm_model(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
    return str(train_sentencepiece([str(p) for p in corpus.values()], str(prefix), vocab_size=VOCAB_SIZE))


@pytest.fixture(scope="session")
def other_spm_model(corpus, tmp_path_factory):
    """A tokenizer of spm_model's size (400 pieces) trained on one source only: another vocabulary."""
    prefix = tmp_path_factory.mktemp("other_tokenizer") / "spm"
    return str(train_sentencepiece([str(corpus["clinical"])], str(prefix), vocab_size=VOCAB_SIZE))


@pytest.fixture(scope="session")
def sp(spm_model):
    """The reference: sentencepiece itself, not our wrapper."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=spm_model)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """{"tokenizer": path, "blend": [...]}: three domains weighted 15:1:4, as the demo builds them."""
    root = tmp_path_factory.mktemp("trunk_data")
    corpus = write_demo_corpus(root / "corpus", docs_per_source=150, seed=0)
    tokenizer = train_sentencepiece([str(p) for p in corpus.values()], str(root / "tok" / "spm"), vocab_size=512)
    weights = {"biomedical": 15, "clinical": 1, "general": 4}
    blend = []
    for name, path in corpus.items():
        preprocess([str(path)], str(root / name), str(tokenizer), append_eod=True, workers=1, progress=False)
        blend.append({"name": name, "weight": weights[name], "train": [str(root / f"{name}_text_document")]})
    return {"tokenizer": str(tokenizer), "blend": blend}


@pytest.fixture(scope="session")
def hf_tokenizer_dir(spm_model, tmp_path_factory):
    """The test sentencepiece model as a Hugging Face LlamaTokenizer folder with a chat template."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copyfile(spm_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (out / "chat_template.jinja").write_text(LLAMA2_JINJA_PLAIN)
    return str(out)
