"""From a generated answer to what is scored: a choice index, a set of choices, an answer span, BIO tags.

Two extractors (`--extractor`):

`mibe-compat` is the rule of Me-LLaMA's released scorer, so numbers compare with the paper:
  - one label: the first choice, in the order of `choices`, that occurs anywhere in the output as a
    substring, after lower-casing both (MedQA, MedMCQA and DDI are matched case-sensitively);
    none found is "missing". So "not sure" answers PubMedQA's "no", and for MedQA (choices A-E) any
    capital "A" in free text ("According to ...") is choice A.
  - DDI: exactly one choice may occur, else "missing".
  - HoC: every choice occurring as a case-sensitive substring.
  - EmrQA: the whole output, scored with the released normalisation (see metrics.py).

`strict` (the default) reads an answer, not a substring:
  - one label: on the first non-empty line, after an optional cue ("Answer:", "The answer is", ...)
    and opening brackets/quotes, the choice the line starts with (longest first; a case-insensitive
    match that must end at a non-alphanumeric character, so "no" does not match "not"); single
    letters (A-E) match case-sensitively, e.g. `B`, `B.`, `(B)`, `B) aspirin`. Otherwise, the
    choice named right after a later cue in the line ("... the answer is B", "best option: B");
    otherwise, the one choice of two or more characters that occurs in the line as a whole word, or
    a single letter written as `(B)`. None or several: "missing".
  - HoC: every choice occurring as a whole phrase (case-insensitive) before the first blank line;
    none: "missing" (and no label predicted).
  - EmrQA: the first non-empty line without its answer cue, scored SQuAD-style.
Both: summaries are the whole output (stripped); NER reads entity spans written as HTML,
`<span class="problem">chest pain</span>`, aligns the output's words to the record's `token` and
gives one BIO tag per token (the released scorer re-tokenised both sides with spaCy instead).
"""

from __future__ import annotations

import difflib
import html
import re
from html.parser import HTMLParser

from melama_mcore.errors import UserError
from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER, MibeTask

EXTRACTORS = ("strict", "mibe-compat")
WORD = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks: how NER text is aligned
ANSWER_CUE = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice|label|output)"
                        r"(?:\s+is)?\s*[:\-]?\s*", re.IGNORECASE)
LATER_CUE = re.compile(r"\b(?:answer|option|choice)\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE)
OPENERS = " \t\"'*([{"


def check_extractor(name: str) -> str:
    if name not in EXTRACTORS:
        raise UserError(f"extractor {name!r}: expected one of {', '.join(EXTRACTORS)}")
    return name


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def answer_line(text: str) -> str:
    """The first non-empty line without a leading answer cue."""
    return ANSWER_CUE.sub("", first_line(text), count=1).strip()


# ---------------------------------------------------------------------------------------------
# One label out of `choices`
# ---------------------------------------------------------------------------------------------
def compat_choice(choices: list[str], text: str, case_sensitive: bool, unique: bool) -> int | None:
    """The released rule (see the module doc)."""
    text = text.strip()
    if not case_sensitive:
        text, choices = text.lower(), [c.lower() for c in choices]
    found = [i for i, choice in enumerate(choices) if choice in text]
    if unique:
        return found[0] if len(found) == 1 else None
    return found[0] if found else None


def _leading_choice(choices: list[str], text: str) -> int | None:
    text = text.lstrip(OPENERS)
    for i in sorted(range(len(choices)), key=lambda i: -len(choices[i])):
        choice = choices[i]
        head = text[: len(choice)]
        same = head == choice if len(choice) == 1 else head.lower() == choice.lower()
        if same and (len(text) == len(choice) or not text[len(choice)].isalnum()):
            return i
    return None


def _whole_word(choice: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(choice)}(?!\w)", re.IGNORECASE)


def strict_choice(choices: list[str], text: str) -> int | None:
    """The stricter rule (see the module doc)."""
    line = first_line(text)
    for candidate in (ANSWER_CUE.sub("", line, count=1), *(line[m.end():] for m in LATER_CUE.finditer(line))):
        found = _leading_choice(choices, candidate)
        if found is not None:
            return found
    hits = {i for i, c in enumerate(choices)
            if (_whole_word(c).search(line) if len(c) > 1 else f"({c})" in line)}
    return hits.pop() if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------
# Any number of choices (HoC)
# ---------------------------------------------------------------------------------------------
def compat_multilabel(choices: list[str], text: str) -> list[int] | None:
    text = text.strip()
    return [i for i, choice in enumerate(choices) if choice in text] or None


def strict_multilabel(choices: list[str], text: str) -> list[int] | None:
    paragraph = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    return [i for i, choice in enumerate(choices) if _whole_word(choice).search(paragraph)] or None


# ---------------------------------------------------------------------------------------------
# Entity spans (NER): HTML in, BIO tags over the record's tokens out
# ---------------------------------------------------------------------------------------------
class _SpanReader(HTMLParser):
    """Words of an HTML fragment, each with the entity type of the innermost enclosing tag that has a
    class (None outside any) and the id of that tag (so adjacent entities stay apart)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.words: list[tuple[str, str | None, int | None]] = []
        self.open: list[tuple[str, str | None, int]] = []
        self.tags_seen = 0

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        self.tags_seen += 1
        self.open.append((tag, classes[0] if classes else None, self.tags_seen))

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] == tag:
                del self.open[i:]
                break

    def handle_data(self, data):
        entity = next(((t, i) for _, t, i in reversed(self.open) if t), (None, None))
        self.words += [(w, *entity) for w in WORD.findall(data)]


def spans_to_html(tokens: list[str], labels: list[str]) -> str:
    """The output format NER prompts ask for: the sentence with each entity in a classed span."""
    parts, i = [], 0
    while i < len(tokens):
        if labels[i] == "O":
            parts.append(html.escape(tokens[i], quote=False))
            i += 1
            continue
        kind, j = labels[i][2:], i + 1
        while j < len(tokens) and labels[j] == f"I-{kind}":
            j += 1
        words = " ".join(html.escape(t, quote=False) for t in tokens[i:j])
        parts.append(f'<span class="{html.escape(kind)}">{words}</span>')
        i = j
    return " ".join(parts)


def html_to_bio(text: str, tokens: list[str]) -> list[str]:
    """BIO tags over `tokens` for the entity spans of `text`: the output's words are aligned to the
    tokens' words (difflib, case-insensitive); a token takes the entity of its first aligned word;
    tokens the output skipped or changed are O."""
    reader = _SpanReader()
    reader.feed(text)
    reader.close()
    predicted = reader.words
    token_words = [(k, w) for k, token in enumerate(tokens) for w in WORD.findall(token)]
    matcher = difflib.SequenceMatcher(None, [w.lower() for _, w in token_words],
                                      [w.lower() for w, _, _ in predicted], autojunk=False)
    entity_of: dict[int, tuple[str | None, int | None]] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            k = token_words[block.a + offset][0]
            entity_of.setdefault(k, predicted[block.b + offset][1:])
    tags, previous = [], (None, None)
    for k in range(len(tokens)):
        kind, span = entity_of.get(k, (None, None))
        if kind is None:
            tags.append("O")
        else:
            tags.append(f"I-{kind}" if (kind, span) == previous else f"B-{kind}")
        previous = (kind, span)
    return tags


# ---------------------------------------------------------------------------------------------
def extract(task: MibeTask, doc: dict, generation: str, extractor: str):
    """What is scored for one generated output: a choice index (None when missing) for one-label
    tasks, a sorted list of indices (None when missing) for HoC, BIO tags for NER, text otherwise."""
    compat = check_extractor(extractor) == "mibe-compat"
    if task.kind == CHOICE:
        if compat:
            return compat_choice(doc["choices"], generation, task.compat_case_sensitive, task.compat_unique)
        return strict_choice(doc["choices"], generation)
    if task.kind == MULTILABEL:
        return (compat_multilabel if compat else strict_multilabel)(doc["choices"], generation)
    if task.kind == NER:
        return html_to_bio(generation, doc["token"])
    if task.kind == EXTRACTIVE_QA:
        return generation if compat else answer_line(generation)
    return generation.strip()
