"""MIBE prompt formats (eval/prompts.py): the template a model is evaluated with, and where it comes from.
A prompt in a template is byte-equal to the prompt part of that template's training format, rendered
here by the instruction-tuning code itself and, independently, written out by hand."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from melama_mcore.data.sft.conversations import Conversation
from melama_mcore.data.sft.templates import BUILT_IN_JINJA, load_template
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import UserError
from melama_mcore.eval.prompts import check_choice, resolve

QUERY = "  Does aspirin reduce stroke risk?\nCONTEXT: a trial.\nANSWER: "  # spaces that llama2-chat strips
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def training_prompt_part(spec: str, folder: Path, prompt: str) -> str:
    """What instruction tuning in `spec` puts before an answer: its rendering of a one-turn conversation,
    cut where the trained span (the answer) begins."""
    text, spans = load_template(spec, load_tokenizer(str(folder))).render(Conversation([(prompt, "Yes.")]))
    return text[:spans[0][0]]


@pytest.fixture()
def model_dirs(hf_tokenizer_dir, tmp_path) -> dict[str, Path]:
    """Tokenizer folders (all prompts need of a model): with the chat template in chat_template.jinja,
    in tokenizer_config.json, and without one."""
    jinja = Path(hf_tokenizer_dir)
    config_only = tmp_path / "config_only"
    shutil.copytree(jinja, config_only)
    (config_only / "chat_template.jinja").unlink()
    config = json.loads((config_only / "tokenizer_config.json").read_text())
    (config_only / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    plain = tmp_path / "plain"
    shutil.copytree(jinja, plain)
    (plain / "chat_template.jinja").unlink()
    return {"jinja": jinja, "config_only": config_only, "plain": plain}


def test_the_model_carries_its_template(model_dirs):
    own = resolve(model_dirs["jinja"], chat=None, chat_template=None)
    assert own.describe()["name"] == "hf" and own.source == f"the model's {model_dirs['jinja'] / 'chat_template.jinja'}"
    assert own.apply(QUERY) == training_prompt_part("hf", model_dirs["jinja"], QUERY)
    assert own.apply(QUERY) == "<s>[INST] " + QUERY.strip() + " [/INST]"  # the template's text, by hand
    assert len(own.describe()["sha256"]) == 64
    from_config = resolve(model_dirs["config_only"], chat=True, chat_template=None)
    assert from_config.source.endswith("tokenizer_config.json")
    assert from_config.apply(QUERY) == f"<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name,by_hand", [
    ("llama2-chat", "<s>[INST] " + QUERY.strip() + " [/INST]"),  # Meta's chat_completion: prompt stripped
    ("me-llama", f"<s>Human: \n{QUERY}\n\nAssistant: \n"),        # Me-LLaMA's wrapper after the BOS
])
def test_a_named_training_template(model_dirs, name, by_hand, tmp_path):
    sha256 = hashlib.sha256(BUILT_IN_JINJA[name].encode()).hexdigest()  # identified by its Jinja equivalent
    for folder in (model_dirs["plain"], model_dirs["jinja"]):  # the flag wins over the model's own
        chosen = resolve(folder, chat=None, chat_template=name)
        assert chosen.describe() == {"name": name, "source": "--chat-template", "sha256": sha256}
        assert chosen.apply(QUERY) == training_prompt_part(name, folder, QUERY) == by_hand
    # A model (or its adapter) carrying that Jinja text: named after it, the same identity and prompts.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "chat_template.jinja").write_text(BUILT_IN_JINJA[name])
    own = resolve(model_dirs["jinja"], chat=None, chat_template=None, adapter=adapter)  # the adapter's wins
    assert own.describe() == {"name": name, "source": f"the model's {adapter / 'chat_template.jinja'}",
                              "sha256": sha256}
    assert own.apply(QUERY) == by_hand


def test_a_jinja_file(model_dirs, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    chosen = resolve(model_dirs["jinja"], chat=None, chat_template=str(template))
    assert chosen.name == str(template)
    assert chosen.apply(QUERY) == training_prompt_part(str(template), model_dirs["jinja"], QUERY)
    assert chosen.apply(QUERY) == f"<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"


def test_plain_prompts_and_the_chat_flag(model_dirs):
    plain = resolve(model_dirs["plain"], chat=None, chat_template=None)
    assert plain.describe() == {"name": None, "source": "the model carries no chat template"}
    assert plain.apply(QUERY) == QUERY
    assert resolve(model_dirs["jinja"], chat=False, chat_template=None).describe() == {"name": None,
                                                                                      "source": "--no-chat"}
    fallback = resolve(model_dirs["plain"], chat=True, chat_template=None)  # --chat without a model template
    assert fallback.name == "me-llama" and fallback.source.startswith("--chat, and the model carries no chat template")
    assert resolve(model_dirs["jinja"], chat=True, chat_template=None).name == "hf"
    with pytest.raises(UserError, match="--chat-template hf: the model .* carry no chat template"):
        resolve(model_dirs["plain"], chat=None, chat_template="hf")
    with pytest.raises(UserError, match="'llama-2': not one of me-llama, llama2-chat, hf and no such file"):
        check_choice("llama-2")
