"""How MIBE prompts reach the model: as the record's `query` (plain), or wrapped in a chat template.

Which one, in this order:
1. `--chat-template NAME|FILE`: a template of instruction tuning (`melama preprocess-sft
   --chat-template`): `me-llama`, `llama2-chat`, `hf` (the model's own, required) or a Jinja file;
2. `--no-chat`: plain;
3. the model's own template, when its Hugging Face folder carries one (`chat_template.jinja`, or
   `chat_template` in tokenizer_config.json, as transformers reads them; `melama convert export-hf`
   writes it there for a tuned run);
4. `--chat` and no template of the model's: `me-llama`, Me-LLaMA's wrapper (the released evaluation's
   only chat format, `Human: \\n{query}\\n\\nAssistant: \\n`);
5. otherwise plain.
Nothing is guessed from the model's path. A template renders the prompt exactly as instruction tuning
rendered a prompt before its answer (data/sft/templates.render_prompt), special-token text included
(`<s>`: lm-eval then adds no second BOS). The whole context (few-shot examples and the question)
becomes one user turn, as the released evaluation wrapped it.
"""

from __future__ import annotations

import hashlib
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
    sha256: str | None = None       # of a Jinja template's text

    def apply(self, context: str) -> str:
        """The text sent to the model for an lm-eval context (few-shot examples and the question)."""
        if self.template is None:
            return context
        from melama_mcore.data.sft.templates import render_prompt

        return render_prompt(self.template, context)

    def describe(self) -> dict:
        """results.json's `protocol.template`."""
        return {"name": self.name, "source": self.source, **({"sha256": self.sha256} if self.sha256 else {})}

    def __str__(self) -> str:
        return f"plain ({self.source})" if self.name is None else f"chat template {self.name} ({self.source})"


def check_choice(spec: str | None) -> None:
    """--chat-template's value, before anything is loaded: a template name or an existing file."""
    from melama_mcore.data.sft.templates import CHOICES

    if spec is not None and spec not in CHOICES and not Path(spec).is_file():
        raise UserError(f"--chat-template {spec!r}: not one of {', '.join(CHOICES)} and no such file")


def model_template_file(hf_dir: Path) -> Path | None:
    """The file of the model folder that carries its chat template, if any."""
    jinja, config = (hf_dir / name for name in MODEL_TEMPLATE_FILES)
    if jinja.is_file():
        return jinja
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):  # no file, or not a JSON object: transformers' problem
        return None
    return config if template else None


def resolve(hf_dir: Path, chat: bool | None, chat_template: str | None) -> PromptFormat:
    """The prompt format for the model in `hf_dir` (see the module doc)."""
    if chat_template is None and chat is False:
        return PromptFormat(None, "--no-chat")
    own = model_template_file(hf_dir)
    if chat_template is None and own is None:
        if not chat:
            return PromptFormat(None, "the model carries no chat template")
        return _load("me-llama", hf_dir, "--chat, and the model carries no chat template: Me-LLaMA's wrapper")
    spec = chat_template or MODEL_TEMPLATE
    if spec == MODEL_TEMPLATE:
        if own is None:
            raise UserError(f"--chat-template {MODEL_TEMPLATE}: the model {hf_dir} carries no chat template "
                            f"(no {' or '.join(MODEL_TEMPLATE_FILES)} with one); name a template or a Jinja file")
        return _load(spec, hf_dir, f"the model's {own}")
    return _load(spec, hf_dir, "--chat-template")


def _load(spec: str, hf_dir: Path, source: str) -> PromptFormat:
    from melama_mcore.data.sft.conversations import RecordError
    from melama_mcore.data.sft.templates import BUILT_IN, JinjaTemplate, load_template
    from melama_mcore.data.tokenizer import load_tokenizer

    template = load_template(spec, load_tokenizer(str(hf_dir)))  # the model's BOS/EOS text
    name = spec if spec in BUILT_IN or spec == MODEL_TEMPLATE else str(Path(spec))
    digest = hashlib.sha256(template.source.encode("utf-8")).hexdigest() if isinstance(template, JinjaTemplate) else None
    prompt_format = PromptFormat(name, source, template, digest)
    try:
        prompt_format.apply("What is the usual adult dose?")
    except (RecordError, IndexError):
        raise DataError(f"chat template {name} ({source}): cannot tell where its answer begins, so no prompt "
                        "can be cut from it") from None
    return prompt_format
