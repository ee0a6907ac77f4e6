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
Both: summaries are the whole output (stripped). NER outputs are entity spans written as HTML,
`<span class="problem">chest pain</span>`:
  - `strict` aligns the output's words to the record's tokens (its `token` list, or the words of its
    gold `answer` HTML) and gives one BIO tag per token: every record counts, an empty output misses
    every gold entity.
  - `mibe-compat` is the released rule: output and gold HTML are both read the way the released
    scorer reads them (top-level text split at spaces; each top-level element's text tokenised, its
    first class the type, counted only for the released types), then aligned greedily token by token;
    what cannot be aligned drops out of the counts (an empty output removes its record). The released
    code tokenised element text with spaCy's `en_core_web_lg`; here `WORD` (words and single
    punctuation marks) stands in for it.
"""

from __future__ import annotations

import difflib
import html
import re
from html.parser import HTMLParser

from melama_mcore.errors import UserError
from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER, RELEASED_ENTITY_TYPES, MibeTask

EXTRACTORS = ("strict", "mibe-compat")
DEFAULT_EXTRACTOR = "mibe-compat"  # the released scorer's rules: numbers comparable with the paper
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
# Entity spans (NER), strict: HTML in, BIO tags over the record's tokens out
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


def html_to_tokens(text: str) -> tuple[list[str], list[str]]:
    """The words of an HTML answer and their BIO tags: the gold of a record in the released form
    (`answer` only, no `token`/`label`)."""
    reader = _SpanReader()
    reader.feed(text)
    reader.close()
    tokens, tags, previous = [], [], (None, None)
    for word, kind, span in reader.words:
        tokens.append(word)
        tags.append("O" if kind is None else f"I-{kind}" if (kind, span) == previous else f"B-{kind}")
        previous = (kind, span)
    return tokens, tags


# ---------------------------------------------------------------------------------------------
# Entity spans (NER), mibe-compat: the released scorer's reading and alignment
# ---------------------------------------------------------------------------------------------
_VOID_ELEMENTS = frozenset("area base br col embed hr img input link meta param source track wbr".split())


class _ReleasedReader(HTMLParser):
    """(word, tag) pairs as the released scorer reads an HTML answer: text outside any element is
    split at whitespace, tagged O; each top-level element's whole text is tokenised (WORD standing in
    for spaCy) and tagged B-/I-<its first class> when that class is a released entity type, else O."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pairs: list[tuple[str, str]] = []
        self.open: list[str] = []  # the element names open now; the first is the top-level element
        self.entity, self.text = None, []

    def handle_starttag(self, tag, attrs):
        if not self.open:
            classes = (dict(attrs).get("class") or "").split()
            self.entity, self.text = (classes[0] if classes else None), []
        if tag not in _VOID_ELEMENTS:
            self.open.append(tag)
        elif not self.open:
            self._close_element()

    def handle_endtag(self, tag):
        if tag in self.open:  # closes the elements opened inside it too; a stray end tag is ignored
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]
            if not self.open:
                self._close_element()

    def handle_data(self, data):
        if self.open:
            self.text.append(data)
        else:
            self.pairs += [(word, "O") for word in data.split()]

    def close(self):
        super().close()
        if self.open:  # an element left open runs to the end, as the parser closes it
            self.open = []
            self._close_element()

    def _close_element(self):
        counted = self.entity in RELEASED_ENTITY_TYPES
        words = WORD.findall("".join(self.text))
        self.pairs += [(w, (f"B-{self.entity}" if i == 0 else f"I-{self.entity}") if counted else "O")
                       for i, w in enumerate(words)]


def released_pairs(text: str) -> list[tuple[str, str]]:
    reader = _ReleasedReader()
    reader.feed(text)
    reader.close()
    return reader.pairs


def _continued(tag: str) -> str:
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def released_alignment(predicted: list[tuple[str, str]], gold: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """The released greedy alignment: walk both token lists; equal tokens pair up; when one token is a
    prefix of the other, the shorter pairs with the longer's head and the rest of the longer stays
    (its tag continued); otherwise both tokens are skipped. Stops at the end of either list.
    Returns (token, predicted tag, gold tag) triples."""
    predicted, gold = list(predicted), list(gold)
    aligned, i, j = [], 0, 0
    while i < len(predicted) and j < len(gold):
        (p_word, p_tag), (g_word, g_tag) = predicted[i], gold[j]
        if p_word == g_word:
            aligned.append((p_word, p_tag, g_tag))
            i, j = i + 1, j + 1
        elif g_word.startswith(p_word):
            aligned.append((p_word, p_tag, g_tag))
            gold[j] = (g_word[len(p_word):], _continued(g_tag))
            i += 1
        elif p_word.startswith(g_word):
            aligned.append((g_word, p_tag, g_tag))
            predicted[i] = (p_word[len(g_word):], _continued(p_tag))
            j += 1
        else:
            i, j = i + 1, j + 1
    return aligned


def compat_ner(output: str, gold_html: str) -> tuple[list[str], list[str]]:
    """(predicted tags, gold tags) over the aligned tokens, as the released scorer builds them."""
    aligned = released_alignment(released_pairs(output), released_pairs(gold_html))
    return [p for _, p, _ in aligned], [g for _, _, g in aligned]


# ---------------------------------------------------------------------------------------------
def extract(task: MibeTask, doc: dict, generation: str, extractor: str):
    """What is scored for one generated output: a choice index (None when missing) for one-label
    tasks, a sorted list of indices (None when missing) for HoC, (predicted BIO tags, gold BIO tags)
    of equal length for NER, text otherwise. `doc` is a checked record (data.check_record)."""
    compat = check_extractor(extractor) == "mibe-compat"
    if task.kind == CHOICE:
        if compat:
            return compat_choice(doc["choices"], generation, task.compat_case_sensitive, task.compat_unique)
        return strict_choice(doc["choices"], generation)
    if task.kind == MULTILABEL:
        return (compat_multilabel if compat else strict_multilabel)(doc["choices"], generation)
    if task.kind == NER:
        if compat:
            return compat_ner(generation, doc["answer"])
        return html_to_bio(generation, doc["token"]), list(doc["label"])
    if task.kind == EXTRACTIVE_QA:
        return generation if compat else answer_line(generation)
    return generation.strip()
