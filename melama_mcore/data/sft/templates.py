"""Chat templates: a Conversation -> (rendered text, character spans of what is trained), and the
template as it travels with the model (`travelling`: {"name", "jinja", "system_prompt"}).

The rendered text writes special tokens as their text (`<s>`, `</s>`); the tokenizer reads them back
as special tokens (Tokenizer.encode_with_offsets). A span covers an answer and its end-of-turn tokens
(EOS), so the model learns to stop.

Built in:
- `me-llama`: Me-LLaMA's wrapper, `Human: \\n{prompt}\\n\\nAssistant: \\n{answer}`, one BOS first and EOS
  after each answer; a system prompt, when there is one, comes first, followed by a blank line:
      <s>[{system}\\n\\n]Human: \\n{p1}\\n\\nAssistant: \\n{a1}</s>Human: \\n{p2}\\n\\nAssistant: \\n{a2}</s>
- `llama2-chat`: Meta's LLaMA-2-chat format (its reference `chat_completion`): each turn
  `<s>[INST] {prompt} [/INST] {answer} </s>` with prompt and answer stripped, and the system prompt
  inside the first turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt}`. The trained span starts
  at the space after `[/INST]`, so the prompt part ends with `[/INST]`, as Meta's code prompts a
  model for its answer (the space is the answer's first token's, `▁word`, which is trained either way).
- a Jinja file or a Hugging Face tokenizer's own `chat_template` (`hf`), rendered by transformers'
  sandboxed renderer with `messages`, `bos_token` and `eos_token`, as apply_chat_template renders it.
  Answers are found by the template's `{% generation %}` blocks when it has them; otherwise by
  rendering turn by turn (the text added by each answer, up to the next prompt); a template that
  rewrites earlier text when a turn is added cannot be used without `{% generation %}` blocks.

Every template has a Jinja text in Hugging Face's apply_chat_template convention (`messages`,
`bos_token`, `eos_token`, `add_generation_prompt`): the built-ins' are ME_LLAMA_JINJA and
LLAMA2_CHAT_JINJA, rendered by transformers byte-equal to the Python renderers (tests). A default
system prompt (`preprocess-sft --system-prompt`) becomes part of that text (`with_system_prompt`), so
the template that travels with the model (into its checkpoints' config.yaml, its exports' tokenizer
files, and `melama eval`) renders the prompts it was tuned on, system prompt included, wherever it
is used (transformers, lm-eval's --apply_chat_template, vLLM).
"""

from __future__ import annotations

import codecs
import hashlib
import re
from pathlib import Path

from melama_mcore.data.sft.conversations import ASSISTANT, Conversation, RecordError
from melama_mcore.errors import DataError, UserError

BUILT_IN = ("me-llama", "llama2-chat")
CHOICES = BUILT_IN + ("hf",)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# The built-in templates in Jinja. Every tag strips the whitespace around it ({{- and {%-), so the
# text renders alike with and without transformers' trim_blocks/lstrip_blocks.
ME_LLAMA_JINJA = """\
{#- me-llama: Me-LLaMA's wrapper, as melama-mcore tunes with it (docs/instruction_tuning.md) -#}
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] + '\\n\\n' }}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- 'Human: \\n' + message['content'] + '\\n\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- 'Assistant: \\n' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('me-llama: roles are system (first only), user and assistant') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant: \\n' }}
{%- endif %}"""

LLAMA2_CHAT_JINJA = """\
{#- llama2-chat: Meta's LLaMA-2-chat format, as melama-mcore tunes with it (docs/instruction_tuning.md) -#}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token }}
    {%- else %}
        {{- raise_exception('llama2-chat: roles are system (first only), user and assistant') }}
    {%- endif %}
{%- endfor %}"""

BUILT_IN_JINJA = {"me-llama": ME_LLAMA_JINJA, "llama2-chat": LLAMA2_CHAT_JINJA}
# Characters a system prompt keeps as they are inside a Jinja string literal; any other is written
# as an escape (\\n, or \\UXXXXXXXX), which Jinja's lexer reads back exactly (quotes, backslashes, ...).
_LITERAL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?()-_/+*=<>[]@&|~^$`")


def _jinja_string(text: str) -> str:
    return '"' + "".join(ch if ch in _LITERAL_SAFE else "\\n" if ch == "\n" else f"\\U{ord(ch):08x}"
                         for ch in text) + '"'


_SYSTEM_PROMPT_LINES = ("{#- the default system prompt it was tuned with (melama preprocess-sft --system-prompt) -#}\n"
                        "{%- if not (messages and messages[0]['role'] == 'system') %}\n"
                        "    {%- set messages = [{'role': 'system', 'content': ", "}] + messages %}\n{%- endif %}")
_SYSTEM_PROMPT_TEXT = re.compile(re.escape(_SYSTEM_PROMPT_LINES[0]) + r'"([ -~]*?)"'
                                 + re.escape(_SYSTEM_PROMPT_LINES[1]))


def with_system_prompt(jinja: str, system_prompt: str | None) -> str:
    """`jinja` rendering a conversation that has no system message as if it had `system_prompt`
    (preprocess-sft --system-prompt); unchanged for None. The lines added come first and render
    nothing; the template's own text follows unchanged."""
    if system_prompt is None:
        return jinja
    return _SYSTEM_PROMPT_LINES[0] + _jinja_string(system_prompt) + _SYSTEM_PROMPT_LINES[1] + jinja


def identify(jinja: str) -> tuple[str | None, str | None]:
    """(the built-in template, the default system prompt) a Jinja text is made of, as
    with_system_prompt(BUILT_IN_JINJA[name], system_prompt) writes it; None for what it is not."""
    system_prompt, body = None, jinja
    found = _SYSTEM_PROMPT_TEXT.match(jinja)
    if found:
        candidate = codecs.decode(found[1], "unicode_escape")  # as Jinja's lexer reads a string literal
        if with_system_prompt(jinja[found.end():], candidate) == jinja:
            system_prompt, body = candidate, jinja[found.end():]
    return next((name for name, text in BUILT_IN_JINJA.items() if text == body), None), system_prompt


class _Text:
    """Rendered text built piece by piece, with the spans of the trained pieces."""

    def __init__(self):
        self.parts, self.spans, self.length = [], [], 0

    def add(self, text: str, trained: bool = False) -> None:
        if trained:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def result(self) -> tuple[str, list[tuple[int, int]]]:
        return "".join(self.parts), self.spans


class _BuiltIn:
    """A built-in template: rendered in Python (spans exact by construction), its Jinja text for travel.
    `system_prompt`: the system prompt of a conversation that has none."""

    name: str

    def __init__(self, bos: str, eos: str, system_prompt: str | None = None):
        self.bos, self.eos, self.system_prompt = bos, eos, system_prompt

    @property
    def jinja(self) -> str:
        return with_system_prompt(BUILT_IN_JINJA[self.name], self.system_prompt)

    def _system(self, conv: Conversation) -> str | None:
        return conv.system if conv.system is not None else self.system_prompt


class MeLlamaTemplate(_BuiltIn):
    name = "me-llama"

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        out = _Text()
        system = self._system(conv)
        out.add(self.bos + (f"{system}\n\n" if system is not None else ""))
        for prompt, answer in conv.turns:
            out.add(f"Human: \n{prompt}\n\nAssistant: \n")
            out.add(answer + self.eos, trained=True)
        return out.result()


class Llama2ChatTemplate(_BuiltIn):
    name = "llama2-chat"

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        out = _Text()
        system = self._system(conv)
        for number, (prompt, answer) in enumerate(conv.turns):
            if number == 0 and system is not None:
                prompt = B_SYS + system + E_SYS + prompt
            out.add(f"{self.bos}{B_INST} {prompt.strip()} {E_INST}")
            out.add(f" {answer.strip()} {self.eos}", trained=True)
        return out.result()


class JinjaTemplate:
    """`source`: the template's own text; `jinja`: what renders (the source, after the lines of a
    default system prompt when there is one)."""

    def __init__(self, source: str, name: str, bos: str, eos: str, system_prompt: str | None = None):
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise DataError(f"{name}: Jinja chat templates are rendered by the `transformers` package "
                            "(pip install melama-mcore[hf]); or use me-llama or llama2-chat") from None

        self._render_jinja = render_jinja_template
        self.source, self.name, self.system_prompt = source, name, system_prompt
        self.jinja = with_system_prompt(source, system_prompt)
        self.kwargs = {"bos_token": bos, "eos_token": eos}
        self.generation_blocks = bool(_GENERATION_TAG.search(source))

    def _render(self, messages: list[dict], add_generation_prompt: bool = False):
        rendered, indices = self._render_jinja([messages], chat_template=self.jinja,
                                               add_generation_prompt=add_generation_prompt,
                                               return_assistant_tokens_mask=self.generation_blocks,
                                               **self.kwargs)
        return rendered[0], (indices[0] if indices else [])

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        messages = conv.messages()
        try:
            text, spans = self._render(messages)
            if self.generation_blocks:
                return text, [tuple(span) for span in spans]
            spans = []
            for k, message in enumerate(messages):
                if message["role"] != ASSISTANT:
                    continue
                before = self._render(messages[:k], add_generation_prompt=True)[0]
                after = self._render(messages[:k + 1])[0]
                if not (after.startswith(before) and text.startswith(after)):
                    raise RecordError(f"turn {k + 1}: the chat template does not render this conversation "
                                      "turn by turn; mark its answers with {% generation %} blocks")
                spans.append((len(before), len(after)))
            return text, spans
        except RecordError:
            raise
        except Exception as err:  # jinja's TemplateError (raise_exception), a syntax error, a TypeError, ...
            raise RecordError(f"the chat template failed on this conversation ({_failure(err, conv)})") from None


def _failure(err: Exception, conv: Conversation) -> str:
    """`Class, line N: message` of an error raised while rendering, N the template's line; the message
    is left out when it quotes the conversation (a template's raise_exception may)."""
    import traceback

    line = getattr(err, "lineno", None)  # a TemplateSyntaxError knows it
    if line is None:
        lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == "<template>"]
        line = lines[-1] if lines else None
    message = (getattr(err, "message", None) or str(err)).strip().splitlines()
    message = message[0] if message else ""
    if any(text.strip() and text.strip() in message for text in conv.texts()):
        message = "message not shown: it quotes the conversation"
    where = f", line {line}" if line is not None else ""
    return f"{type(err).__name__}{where}" + (f": {message}" if message else "")


def _special_text(tok, token_id) -> str:
    if token_id is None:
        return ""
    return next(text for text, i in tok.special_texts.items() if i == token_id)


def load_template(spec: str, tok, system_prompt: str | None = None):
    """`me-llama`, `llama2-chat`, `hf` (the tokenizer folder's own template) or a Jinja file;
    `system_prompt`: for conversations that have none. Checks the template on a small invented
    conversation, so a broken one stops before any data is read."""
    bos, eos = _special_text(tok, tok.bos_id), _special_text(tok, tok.eos_id)
    if spec == "me-llama":
        return MeLlamaTemplate(bos, eos, system_prompt)
    if spec == "llama2-chat":
        return Llama2ChatTemplate(bos, eos, system_prompt)
    if spec == "hf":
        if tok.kind != "hf":
            raise UserError("--chat-template hf reads the chat_template of a Hugging Face tokenizer folder; "
                            f"{tok.path} is a sentencepiece model (pass a folder, or a template file)")
        if tok.chat_template is None:
            raise DataError(f"{tok.path}: the tokenizer folder has no chat_template")
        template = JinjaTemplate(tok.chat_template, "hf", bos, eos, system_prompt)
    else:
        path = Path(spec)
        if path.is_dir():
            raise UserError(f"--chat-template {spec!r}: a folder; pass a Jinja file, or --chat-template hf with the "
                            "folder as --tokenizer-model to use its tokenizer's chat_template")
        if not path.is_file():
            raise UserError(f"--chat-template {spec!r}: not one of {', '.join(CHOICES)} and no such file")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{spec}: cannot read the chat template ({type(err).__name__})") from None
        template = JinjaTemplate(source, spec, bos, eos, system_prompt)  # named by its path as given
    check_template(template, spec)
    return template


def jinja_template(source: str, name: str, tok):
    """A Jinja text read from elsewhere (a model folder's tokenizer files), checked as load_template
    checks a template; the tokenizer gives BOS and EOS."""
    template = JinjaTemplate(source, name, _special_text(tok, tok.bos_id), _special_text(tok, tok.eos_id))
    check_template(template, name)
    return template


def check_template(template, spec: str) -> None:
    sample = Conversation([("What is the usual adult dose?", "Five milligrams once a day."),
                           ("And for children?", "Ask a paediatrician.")])
    try:
        text, spans = template.render(sample)
    except RecordError as err:
        raise DataError(f"{spec}: the chat template fails on a two-turn test conversation: {err}") from None
    if len(spans) != 2 or not all(answer in text[a:b] for answer, (a, b) in zip(("Five", "Ask"), spans)):
        raise DataError(f"{spec}: the chat template's answers could not be located in its output")


def render_prompt(template, prompt: str) -> str:
    """The text a model tuned with `template` is shown before it answers `prompt` (one user turn; the
    template's default system prompt, if it has one): the conversation rendered up to where the
    answer's trained span begins. What `melama eval` sends to a model tuned in this format."""
    text, spans = template.render(Conversation([(prompt, "")]))
    return text[:spans[-1][0]]


def travelling(template) -> dict:
    """The template as it travels with the data and the model (the preprocess-sft marker, a run's
    data.chat_template, an export's tokenizer files): {"name", "jinja", "system_prompt"}."""
    return {"name": template.name, "jinja": template.jinja, "system_prompt": template.system_prompt}


def jinja_sha256(jinja: str) -> str:
    """A template's identity: its Jinja text's sha256 (what renders, whatever its name or file)."""
    return hashlib.sha256(jinja.encode("utf-8")).hexdigest()
