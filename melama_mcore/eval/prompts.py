"""How MIBE prompts reach the model: as the record's `query` (plain), or wrapped in a chat template.

Which one, in this order:
1. `--chat-template NAME|FILE`: a template of instruction tuning (`melama preprocess-sft
   --chat-template`): `me-llama`, `llama2-chat` (no system prompt), `hf` (the model's own, required)
   or a Jinja file;
2. `--no-chat`: plain;
3. the model's own template: the one a PEFT adapter folder carries, else the model folder's
   (`chat_template.jinja`, or `chat_template` in tokenizer_config.json, as transformers reads them).
   `melama convert export-hf`/`export-peft` write a tuned run's template there (with the system
   prompt it was tuned with, if any), and `melama eval` of a megatron checkpoint exports it the same way;
4. `--chat` and no template of the model's: `me-llama`, Me-LLaMA's wrapper (the released evaluation's
   only chat format, `Human: \\n{query}\\n\\nAssistant: \\n`);
5. otherwise plain.
Nothing is guessed from the model's path. A template renders the prompt exactly as instruction tuning
rendered a prompt before its answer (data/sft/templates.render_prompt), special-token text included
(`<s>`: lm-eval then adds no second BOS). The whole context (few-shot examples and the question)
becomes one user turn, as the released evaluation wrapped it. A template is identified by its Jinja
text's sha256 (the built-ins' Jinja equivalents included), whatever its name or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.errors import DataError, UserError

MODEL_TEMPLATE = "hf"  # the training side's name for a tokenizer folder's own template
MODEL_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")  # where transformers reads it, in order


@dataclass(frozen=True)
class PromptFormat:
    name: str | None   # me-llama, llama2-chat, hf (the model's own), a Jinja file; None: plain prompts
    source: str        # why this one: the flag, or the model file it came from
    template: object | None = None  # a data.sft.templates template
    sha256: str | None = None       # of the template's Jinja text
    system_prompt: str | None = None  # the default system prompt the template carries (preprocess-sft's)

    def apply(self, context: str) -> str:
        """The text sent to the model for an lm-eval context (few-shot examples and the question)."""
        if self.template is None:
            return context
        from melama_mcore.data.sft.templates import render_prompt

        return render_prompt(self.template, context)

    def describe(self) -> dict:
        """results.json's `protocol.template`."""
        return {"name": self.name, "source": self.source, **({"sha256": self.sha256} if self.sha256 else {}),
                **({"system_prompt": self.system_prompt} if self.system_prompt is not None else {})}

    def __str__(self) -> str:
        if self.name is None:
            return f"plain ({self.source})"
        system = ", with the default system prompt it carries" if self.system_prompt is not None else ""
        return f"chat template {self.name}{system} ({self.source}; sha256 {self.sha256[:12]})"


def check_choice(spec: str | None) -> None:
    """--chat-template's value, before anything is loaded: a template name or an existing file."""
    from melama_mcore.data.sft.templates import CHOICES

    if spec is not None and spec not in CHOICES and not Path(spec).is_file():
        raise UserError(f"--chat-template {spec!r}: not one of {', '.join(CHOICES)} and no such file")


def model_template(folder: Path) -> tuple[Path, str] | None:
    """(the file, the Jinja text) of the chat template a model or adapter folder carries, as
    transformers reads it: chat_template.jinja, else `chat_template` in tokenizer_config.json (a text,
    or the one named "default" of a list); None when it carries none."""
    jinja, config = (folder / name for name in MODEL_TEMPLATE_FILES)
    if jinja.is_file():
        try:
            return jinja, jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{jinja}: cannot read the chat template ({type(err).__name__})") from None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):  # no file, or not a JSON object: transformers' problem
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (config, template) if isinstance(template, str) and template else None


def resolve(hf_dir: Path, chat: bool | None, chat_template: str | None, adapter: Path | None = None,
            origin: str | None = None) -> PromptFormat:
    """The prompt format for the model in `hf_dir`, with the PEFT adapter folder `adapter` if any
    (see the module doc); `origin`: where the model's own template comes from, when its files are a
    temporary export (default: the file it is read from)."""
    if chat_template is None and chat is False:
        return PromptFormat(None, "--no-chat")
    own = (model_template(adapter) if adapter is not None else None) or model_template(hf_dir)
    if chat_template is None and own is None:
        if not chat:
            return PromptFormat(None, "the model carries no chat template")
        return _load("me-llama", hf_dir, "--chat, and the model carries no chat template: Me-LLaMA's wrapper")
    if chat_template in (None, MODEL_TEMPLATE):
        if own is None:
            where = f"the model {hf_dir}" + (f" and the adapter {adapter}" if adapter is not None else "")
            raise UserError(f"--chat-template {MODEL_TEMPLATE}: {where} carry no chat template (no "
                            f"{' or '.join(MODEL_TEMPLATE_FILES)} with one); name a template or a Jinja file")
        return _load_own(*own, hf_dir, origin)
    return _load(chat_template, hf_dir, "--chat-template")


def _load(spec: str, hf_dir: Path, source: str) -> PromptFormat:
    from melama_mcore.data.sft.templates import load_template
    from melama_mcore.data.tokenizer import load_tokenizer

    template = load_template(spec, load_tokenizer(str(hf_dir)))  # the model's BOS/EOS text
    return _checked(spec, source, template)  # a built-in's name, or the file's path as given


def _load_own(file: Path, jinja: str, hf_dir: Path, origin: str | None) -> PromptFormat:
    """The model's own template; named after the built-in it is (with a default system prompt or
    not), else `hf`."""
    from melama_mcore.data.sft.templates import identify, jinja_template
    from melama_mcore.data.tokenizer import load_tokenizer

    template = jinja_template(jinja, str(file), load_tokenizer(str(hf_dir)))
    name, system_prompt = identify(jinja)
    return _checked(name or MODEL_TEMPLATE, origin or f"the model's {file}", template, system_prompt)


def _checked(name: str, source: str, template, system_prompt: str | None = None) -> PromptFormat:
    from melama_mcore.data.sft.conversations import RecordError
    from melama_mcore.data.sft.templates import jinja_sha256

    prompt_format = PromptFormat(name, source, template, jinja_sha256(template.jinja), system_prompt)
    try:
        prompt_format.apply("What is the usual adult dose?")
    except (RecordError, IndexError):
        raise DataError(f"chat template {name} ({source}): cannot tell where its answer begins, so no prompt "
                        "can be cut from it") from None
    return prompt_format
