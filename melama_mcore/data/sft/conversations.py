"""Instruction records -> conversations: an optional system prompt and (prompt, answer) turns.

Accepted JSONL records (other keys, such as `id`, are ignored):
- Me-LLaMA / ShareGPT: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
  (`from`: human or user; gpt, agent or assistant; system, first only);
- messages: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]};
- Alpaca: {"instruction": ..., "input": ... (optional), "output": ...}; the prompt is the instruction,
  followed by a blank line and the input when there is one.
Turns must alternate prompt, answer, ..., and end with an answer; no prompt or answer may be empty
(blank): an empty answer would teach the model to stop at once, an empty prompt to answer nothing. A
record holds one of the formats: one carrying two (e.g. both `conversations` and `messages`) is
refused rather than read one way. Reasons for refusing a record name the problem and the turn, never
the text (it may be patient data).
"""

from __future__ import annotations

from dataclasses import dataclass

from melama_mcore.data.inputs import json_type

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
SPEAKERS = {"human": USER, "user": USER, "gpt": ASSISTANT, "agent": ASSISTANT, "assistant": ASSISTANT,
            "system": SYSTEM}
FORMATS = {"conversations": ("from", "value"), "messages": ("role", "content")}


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (prompt, answer)
    system: str | None = None

    def messages(self) -> list[dict]:
        """In the `messages` format (what Hugging Face chat templates read)."""
        out = [{"role": SYSTEM, "content": self.system}] if self.system is not None else []
        for prompt, answer in self.turns:
            out += [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": answer}]
        return out

    def texts(self) -> list[str]:
        return ([self.system] if self.system is not None else []) + [t for turn in self.turns for t in turn]


class RecordError(ValueError):
    """A record that cannot be used; the message is safe to print (no record text)."""


def _kind(value) -> str:
    return json_type(value)


def _string(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise RecordError(f"{where}missing key {key!r}")
        return None
    value = obj[key]
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{where}key {key!r} is {_kind(value)}, expected a string")
    return value


def _from_turns(items, key: str) -> Conversation:
    speaker_key, text_key = FORMATS[key]
    if not isinstance(items, list):
        raise RecordError(f"{key!r} is {_kind(items)}, expected a list of turns")
    if not items:
        raise RecordError(f"{key!r} holds no turns")
    system, speakers, texts = None, [], []
    for number, item in enumerate(items, start=1):
        where = f"turn {number}: "
        if not isinstance(item, dict):
            raise RecordError(f"{where}{_kind(item)}, expected an object")
        speaker = _string(item, speaker_key, where)
        role = SPEAKERS.get(speaker.strip().lower())
        if role is None:
            raise RecordError(f"{where}unknown {speaker_key!r} (expected one of {', '.join(SPEAKERS)})")
        text = _string(item, text_key, where)
        if role == SYSTEM:
            if number != 1:
                raise RecordError(f"{where}a system prompt is only allowed as the first turn")
            system = text
            continue
        expected = USER if len(speakers) % 2 == 0 else ASSISTANT
        if role != expected:
            raise RecordError(f"{where}expected {'a prompt' if expected == USER else 'an answer'}: "
                              "turns must alternate prompt, answer")
        if not text.strip():
            raise RecordError(f"{where}empty {'prompt' if role == USER else 'answer'}")
        speakers.append(role)
        texts.append(text)
    if not texts:
        raise RecordError(f"{key!r} holds no prompt")
    if len(texts) % 2:
        raise RecordError(f"turn {len(items)}: the conversation ends with a prompt, not an answer")
    return Conversation(list(zip(texts[0::2], texts[1::2])), system)


ALPACA_KEYS = ("instruction", "output")


def conversation_from_record(obj: dict) -> Conversation:
    """The conversation in one parsed JSONL object; RecordError when it has none, several, or it is
    malformed."""
    present = [key for key in FORMATS if key in obj] + (["instruction/output"] if any(k in obj for k in ALPACA_KEYS)
                                                        else [])
    if len(present) > 1:
        raise RecordError(f"both {' and '.join(repr(k) for k in present)} keys: one conversation format per record")
    if not present:
        raise RecordError("no 'conversations', 'messages' or 'instruction'/'output' key")
    if present[0] in FORMATS:
        return _from_turns(obj[present[0]], present[0])
    instruction, output = _string(obj, "instruction", ""), _string(obj, "output", "")
    extra = _string(obj, "input", "", required=False)
    prompt = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
    if not prompt.strip():
        raise RecordError("empty prompt ('instruction' and 'input')")
    if not output.strip():
        raise RecordError("empty answer ('output')")
    return Conversation([(prompt, output)])
