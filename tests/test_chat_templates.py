"""The chat template's journey, in process: the built-in templates' Jinja equivalents render, through
transformers' own apply_chat_template, byte-equal to the Python renderers that write the training
data (whole conversations, and every prompt part before an answer); the template preprocess-sft
records reproduces its data's token ids, default system prompt included; the trainer's blend check;
the export's tokenizer files as transformers reads them; and `melama report`'s rule for comparing
templates. The journey through training, export and `melama eval`: test_eval_tuned_model.py."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest

from melama_mcore.data.sft.conversations import Conversation
from melama_mcore.data.sft.templates import (BUILT_IN_JINJA, LLAMA2_CHAT_JINJA, ME_LLAMA_JINJA, Llama2ChatTemplate,
                                             MeLlamaTemplate, identify, jinja_sha256, render_prompt,
                                             with_system_prompt)
from sft_fixtures import LLAMA2_JINJA_PLAIN, RECORDS, read_sft, write_jsonl

# A system prompt that a Jinja string literal must carry exactly: quotes, backslashes, template syntax,
# line breaks, non-ASCII (one beyond the BMP).
ODD_SYSTEM = 'Say "yes" or \'no\' \\ {{ x }} {% if %} #}\r\n\tthen stop. \u00e9\u2603 \U0001f600 '
CONVERSATIONS = [Conversation(turns, system) for _, system, turns in RECORDS] + [
    Conversation([("one", "1"), (" two\r\n", "2 \n"), ("\tthree\t", "  3  ")]),   # three turns, stray whitespace
    Conversation([("Hi", "Hello.")], ""),                                          # an empty system prompt
    Conversation([("{{ not a tag }} {% raw %}", "</ s> <s > [/INST]")], "\n padded system \n"),
    Conversation([("\u00e6\u00f8 \U0001f600", "\u2603")], ODD_SYSTEM),
]


@pytest.fixture(scope="module")
def hf_tok(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.mark.parametrize("template_class", [MeLlamaTemplate, Llama2ChatTemplate])
@pytest.mark.parametrize("system_prompt", [None, "Answer briefly.", ODD_SYSTEM])
def test_built_in_jinja_renders_as_the_python_renderer(template_class, system_prompt, hf_tok):
    template = template_class(hf_tok.bos_token, hf_tok.eos_token, system_prompt)
    assert template.jinja == with_system_prompt(BUILT_IN_JINJA[template.name], system_prompt)
    assert identify(template.jinja) == (template.name, system_prompt)
    for conv in CONVERSATIONS:
        text, spans = template.render(conv)
        messages = conv.messages()
        assert hf_tok.apply_chat_template(messages, chat_template=template.jinja, tokenize=False) == text
        # every prompt part: the conversation up to a user turn, with the generation prompt, ends where
        # the training format's trained span (the answer) begins
        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(answers) == len(spans)
        for k, (start, _) in zip(answers, spans):
            assert hf_tok.apply_chat_template(messages[:k], chat_template=template.jinja, tokenize=False,
                                              add_generation_prompt=True) == text[:start]
    # what `melama eval` shows a model tuned in this format: the default system prompt included
    prompt = render_prompt(template, " Is it benign?\n")
    assert prompt == hf_tok.apply_chat_template([{"role": "user", "content": " Is it benign?\n"}],
                                                chat_template=template.jinja, tokenize=False,
                                                add_generation_prompt=True)
    if system_prompt is None:
        by_hand = {"me-llama": "<s>Human: \n Is it benign?\n\n\nAssistant: \n",
                   "llama2-chat": "<s>[INST] Is it benign? [/INST]"}
    else:
        by_hand = {"me-llama": f"<s>{system_prompt}\n\nHuman: \n Is it benign?\n\n\nAssistant: \n",
                   "llama2-chat": f"<s>[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n Is it benign? [/INST]"}
    assert prompt == by_hand[template.name]


def test_preprocess_records_a_template_that_reproduces_its_data(tmp_path, hf_tokenizer_dir, hf_tok):
    """The marker's template, rendered and tokenised by transformers on each record as it is (no system
    prompt, or its own), gives the token ids preprocess-sft wrote: the default system prompt travels."""
    from melama_mcore.data.sft.indexed import marker_chat_template, read_marker
    from melama_mcore.data.sft.preprocess import preprocess_sft

    src = write_jsonl(tmp_path / "in.jsonl", [r for r, _, _ in RECORDS])
    preprocess_sft([src], str(tmp_path / "chat"), hf_tokenizer_dir, chat_template="llama2-chat",
                   system_prompt=ODD_SYSTEM, workers=1, progress=False)
    marker = read_marker(tmp_path / "chat_sft_document")
    assert marker["template"] == {"name": "llama2-chat", "jinja": with_system_prompt(LLAMA2_CHAT_JINJA, ODD_SYSTEM),
                                  "system_prompt": ODD_SYSTEM}
    assert marker_chat_template(marker) == marker["template"]
    for (ids, _), (_, system, turns) in zip(read_sft(tmp_path / "chat_sft_document"), RECORDS):
        messages = Conversation(turns, system).messages()
        assert ids == hf_tok.apply_chat_template(messages, chat_template=marker["template"]["jinja"], tokenize=True,
                                                 return_dict=True)["input_ids"]
    # markers written before the template's text was recorded
    old = {"template": {"name": "me-llama"}, "system_prompt": False}
    assert marker_chat_template(old) == {"name": "me-llama", "jinja": ME_LLAMA_JINJA, "system_prompt": None}
    assert marker_chat_template({"template": {"name": "me-llama"}, "system_prompt": True}) is None  # its text unknown
    assert marker_chat_template({"template": {"name": "a.jinja", "sha256": "0" * 64}, "system_prompt": False}) is None


def _prefix(tmp_path, name: str, tokenizer: str, **options) -> str:
    from melama_mcore.data.sft.preprocess import preprocess_sft

    src = write_jsonl(tmp_path / f"{name}.jsonl", [r for r, _, _ in RECORDS])
    preprocess_sft([src], str(tmp_path / name), tokenizer, workers=1, progress=False, **options)
    return str(tmp_path / f"{name}_sft_document")


def test_a_blend_carries_one_template(tmp_path, spm_model, caplog):
    from melama_mcore.cli import run_main
    from melama_mcore.data.blend import load_blend
    from melama_mcore.data.sft.indexed import blend_chat_template, marker_path
    from melama_mcore.train import main as train

    me_llama = _prefix(tmp_path, "a", spm_model)
    same = _prefix(tmp_path, "b", spm_model, chat_template="me-llama")
    llama2 = _prefix(tmp_path, "c", spm_model, chat_template="llama2-chat", system_prompt="Be brief.")

    def blend(*prefixes):
        return [{"name": f"s{i}", "weight": 1, "train": [p]} for i, p in enumerate(prefixes)]

    assert blend_chat_template(load_blend(blend(me_llama, same))) == {"name": "me-llama", "jinja": ME_LLAMA_JINJA,
                                                                      "system_prompt": None}

    # a marker that does not record the template's text: the run carries none, and says so
    marker = json.loads(Path(marker_path(same)).read_text())
    Path(marker_path(same)).write_text(json.dumps({**marker, "template": {"name": "x.jinja", "sha256": "0" * 64}}))
    with caplog.at_level(logging.WARNING):
        assert blend_chat_template(load_blend(blend(me_llama, same))) is None
    assert f"{same}: the marker does not record the chat template's text" in caplog.text

    # two templates: refused before any process group, both named, through the trainer's command line
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.tokenizer={spm_model}", "training.device=cpu",
                 "training.seq_length=64", "model.preset=nano", "training.global_batch_size=8",
                 f"data.blend={json.dumps(blend(me_llama, llama2))}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_main(train, overrides) == 2
    last = err.getvalue().strip().splitlines()[-1]
    sha_a, sha_c = (jinja_sha256(t)[:12] for t in (ME_LLAMA_JINJA, with_system_prompt(LLAMA2_CHAT_JINJA, "Be brief.")))
    assert last == (f"error: the blend's instruction data was rendered with different chat templates: {me_llama} with "
                    f"me-llama (sha256 {sha_a}), {llama2} with llama2-chat, with a system prompt (sha256 {sha_c}). A "
                    "model is tuned in one format, the one its exports carry and evaluation prompts in: run "
                    "preprocess-sft again on one side with the other's --chat-template (and --system-prompt)")
    assert "Traceback" not in err.getvalue()


def test_export_tokenizer_files_carry_the_template(tmp_path, spm_model, hf_tokenizer_dir, hf_tok):
    """What export-hf / export-peft write: transformers' AutoTokenizer reads the run's template from
    the folder, from a sentencepiece model or a tokenizer folder (whose own template it replaces)."""
    from transformers import AutoTokenizer

    from melama_mcore.checkpoint.hf_folder import copy_tokenizer
    from melama_mcore.config.job_config import dump_config, load_config
    from melama_mcore.data.sft.templates import travelling

    template = travelling(Llama2ChatTemplate("<s>", "</s>", ODD_SYSTEM))
    # data.chat_template survives config.yaml (every checkpoint's) unchanged
    config = tmp_path / "config.yaml"
    cfg = load_config(None, [])
    cfg.data.chat_template = template
    config.write_text(dump_config(cfg))
    assert load_config(config).data.chat_template == template

    question = [{"role": "user", "content": "Is it benign?"}]
    expected = render_prompt(Llama2ChatTemplate("<s>", "</s>", ODD_SYSTEM), "Is it benign?")
    for name, source in (("spm", Path(spm_model)), ("folder", Path(hf_tokenizer_dir))):
        out = tmp_path / name
        out.mkdir()
        copy_tokenizer(source, out, template)
        assert (out / "chat_template.jinja").read_text(encoding="utf-8") == template["jinja"]
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template["jinja"]
        loaded = AutoTokenizer.from_pretrained(out)
        assert loaded.chat_template == template["jinja"]
        assert loaded.apply_chat_template(question, tokenize=False, add_generation_prompt=True) == expected
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # a run that was not instruction-tuned: the tokenizer's own template, as it is
    plain = tmp_path / "plain"
    plain.mkdir()
    copy_tokenizer(Path(hf_tokenizer_dir), plain, None)
    assert AutoTokenizer.from_pretrained(plain).chat_template == LLAMA2_JINJA_PLAIN == hf_tok.chat_template


def test_report_names_each_models_template_by_its_text(tmp_path):
    """The template is the model's, not the protocol's: evaluations in any template are compared (one
    group), each named by its template's text (sha256), whatever its name and source (a flag, the
    model's file); a default system prompt is another text."""
    from melama_mcore.report.build import make_report

    me_llama = jinja_sha256(ME_LLAMA_JINJA)
    with_system = jinja_sha256(with_system_prompt(ME_LLAMA_JINJA, "Be brief."))
    templates = {"flag": {"name": "me-llama", "source": "--chat-template", "sha256": me_llama},
                 "own": {"name": "me-llama", "source": "the model's /a/chat_template.jinja", "sha256": me_llama},
                 "file": {"name": "tpl/me.jinja", "source": "--chat-template", "sha256": me_llama},
                 "system": {"name": "me-llama", "source": "--chat-template", "sha256": with_system,
                            "system_prompt": "Be brief."},
                 "older": {"name": "me-llama", "source": "--chat-template"}}  # before sha256 was recorded
    inputs = []
    for label, template in templates.items():
        folder = tmp_path / label
        folder.mkdir()
        protocol = {"extractor": "mibe-compat", "template": template, "limit": None, "max_new_tokens": 256,
                    "num_fewshot": None, "backend": "hf", "model": label}
        (folder / "results.json").write_text(json.dumps({"protocol": protocol, "pubmedqa": {"accuracy": 0.5}}))
        inputs.append(folder)
    report = make_report(inputs, tmp_path / "report", baseline="flag")
    [group] = report.data["scores"]
    assert group["models"] == list(templates)
    markdown = (tmp_path / "report" / "report.md").read_text()
    scored_with = next(line for line in markdown.splitlines() if line.startswith("Scored with: "))
    assert (f"flag: backend hf, model flag, prompts me-llama (sha256 {me_llama[:12]}); "
            f"own: backend hf, model own, prompts me-llama (sha256 {me_llama[:12]}); "
            f"file: backend hf, model file, prompts tpl/me.jinja (sha256 {me_llama[:12]}); "
            f"system: backend hf, model system, prompts me-llama (sha256 {with_system[:12]}); "
            "older: backend hf, model older, prompts me-llama.") in scored_with
