"""Inputs the stages share, made once per run in the shared folder: a synthetic corpus (made-up words
in a few sentence patterns, so a tiny model learns something; no real text) and a sentencepiece
tokenizer trained on it with `melama train-tokenizer`."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gpu_check.runner import Context

DOCUMENTS = 400
VOCAB_SIZE = 512
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "st", "tr"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou"]


def _words(rng: random.Random, count: int) -> list[str]:
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def write_corpus(path: Path, documents: int = DOCUMENTS, seed: int = 0) -> Path:
    """JSONL, one {"text": ...} per line, deterministic for a seed."""
    rng = random.Random(seed)
    nouns, verbs, adjectives = _words(rng, 120), _words(rng, 40), _words(rng, 40)
    lines = []
    for _ in range(documents):
        sentences = [f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} "
                     f"a {rng.choice(nouns)} near the {rng.choice(nouns)}." for _ in range(rng.randint(4, 9))]
        lines.append(json.dumps({"text": " ".join(sentences)}))
    tmp = path.with_name(path.name + ".incomplete")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def corpus(ctx: Context) -> Path:
    path = ctx.shared / "corpus.jsonl"
    return path if path.exists() else write_corpus(path)


def tokenizer(ctx: Context) -> Path:
    """shared/spm.model, trained by `melama train-tokenizer` the first time a stage asks."""
    model = ctx.shared / "spm.model"
    if not model.exists():
        ctx.job("tokenizer", "melama_mcore.cli", ["train-tokenizer", "--input", corpus(ctx), "--model-prefix",
                                                  ctx.shared / "spm", "--vocab-size", VOCAB_SIZE, "--threads", 2])
    return model
