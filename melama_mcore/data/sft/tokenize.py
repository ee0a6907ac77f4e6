"""Rendered conversations -> token ids and a per-token loss mask.

A token is trained (mask 1) when any character it was read from lies in an answer span; a token read
from no character (a byte-fallback piece's leading bytes, sentencepiece's dummy prefix) takes the
status of the character where it starts. So the ids are exactly the tokenizer's ids for the rendered
text, and the mask marks the answers and the EOS after each.
"""

from __future__ import annotations

import re

import numpy as np

from melama_mcore.data.sft.conversations import Conversation, RecordError


def answer_mask(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 per token: 1 where [start, max(end, start + 1)) overlaps a span (spans sorted, disjoint)."""
    mask = np.zeros(len(starts), dtype=np.uint8)
    if not spans or not len(starts):
        return mask
    span_starts = np.array([a for a, _ in spans], dtype=np.int64)
    span_ends = np.array([b for _, b in spans], dtype=np.int64)
    lo, hi = np.asarray(starts, np.int64), np.maximum(np.asarray(ends, np.int64), np.asarray(starts, np.int64) + 1)
    first = np.searchsorted(span_ends, lo, side="right")  # the first span ending after the token starts
    inside = first < len(spans)
    mask[inside] = span_starts[first[inside]] < hi[inside]
    return mask


def tokenize_rendered(tok, rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int64, mask uint8) per rendered conversation."""
    encoded = tok.encode_with_offsets([text for text, _ in rendered])
    return [(np.asarray(ids, dtype=np.int64), answer_mask(starts, ends, spans))
            for (ids, starts, ends), (_, spans) in zip(encoded, rendered)]


def special_text_pattern(specials) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")


def refuse_special_text(conv: Conversation, pattern: re.Pattern) -> None:
    """Text that the tokenizer would read as a special token (`</s>` in an answer would end it early)
    is refused rather than silently turned into control tokens. `pattern`: special_text_pattern."""
    for text in conv.texts():
        found = pattern.search(text)
        if found:
            raise RecordError(f"contains the text of the special token {found.group()!r}")
