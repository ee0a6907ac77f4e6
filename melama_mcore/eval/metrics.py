"""MIBE's metrics over lists of extracted predictions, computed with the field's libraries.

- accuracy, missing_rate: shares of records. A missing prediction (None) is wrong.
- macro_f1 (one label): scikit-learn's macro F1 over the labels that occur in the gold answers, as
  the released scorer computes it; a missing prediction counts against its gold label's recall.
- macro_f1 (HoC): scikit-learn's macro F1 over the multi-hot label matrix (every label a column).
- exact_match, token_f1 (EmrQA): `strict` is SQuAD's (lower-case, no punctuation or articles, bag of
  words); `mibe-compat` is the released scorer's: lower-case, punctuation removed, and *characters*
  as tokens (its normaliser joins characters with spaces), token F1 on the set of shared characters.
- entity_f1: seqeval's entity-level F1 (an entity counts only with exact boundaries and type).
- rouge_1, rouge_2, rouge_l: rouge-score F-measures (default tokenizer, no stemming, ROUGE-L
  without sentence splitting), averaged over records. (The paper's HF `evaluate` ROUGE reports the
  median of a bootstrap of that average instead: the same up to resampling noise.)
- bertscore_f1: bert-score F1 averaged over records, with the model of MELAMA_BERTSCORE_MODEL (a
  local folder; the paper used bert-base-multilingual-cased), else that model if it is in the local
  Hugging Face cache; nothing is downloaded. Without a model it is not computed (null).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import string
from pathlib import Path

from melama_mcore.errors import UserError

log = logging.getLogger(__name__)

BERTSCORE_ENV = "MELAMA_BERTSCORE_MODEL"
BERTSCORE_DEFAULT = "bert-base-multilingual-cased"  # the paper's model
MISSING = -1  # what a missing label becomes for scikit-learn
PUNCTUATION = frozenset(string.punctuation)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
def accuracy(preds: list[int | None], golds: list[int]) -> float:
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def missing_rate(preds: list) -> float:
    return sum(p is None for p in preds) / len(preds)


def macro_f1(preds: list[int | None], golds: list[int]) -> float:
    from sklearn.metrics import f1_score

    preds = [MISSING if p is None else p for p in preds]
    return float(f1_score(golds, preds, labels=sorted(set(golds)), average="macro", zero_division=0))


def multilabel_macro_f1(preds: list[list[int] | None], golds: list[list[int]]) -> float:
    """preds: the predicted label indices per record (None: none); golds: multi-hot rows."""
    from sklearn.metrics import f1_score

    hot = [[int(i in (p or ())) for i in range(len(g))] for p, g in zip(preds, golds)]
    return float(f1_score(golds, hot, average="macro", zero_division=0))


# ---------------------------------------------------------------------------------------------
# Extractive QA
# ---------------------------------------------------------------------------------------------
def squad_normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match(pred: str, gold: str) -> float:
    return float(squad_normalize(pred) == squad_normalize(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = squad_normalize(pred), squad_normalize(gold)
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def compat_normalize(text: str) -> list[str]:
    """The released scorer's normaliser: lower-case, drop punctuation, then every character a token."""
    return [ch for ch in text.lower() if ch not in PUNCTUATION and not ch.isspace()]


def compat_exact_match(pred: str, gold: str) -> float:
    return float(compat_normalize(pred) == compat_normalize(gold))


def compat_token_f1(pred: str, gold: str) -> float:
    """The released F1: shared *distinct* tokens over token counts (set intersection, list lengths)."""
    p, g = compat_normalize(pred), compat_normalize(gold)
    if not p or not g:
        return float(p == g)
    common = len(set(p) & set(g))
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# NER
# ---------------------------------------------------------------------------------------------
def entity_f1(golds: list[list[str]], preds: list[list[str]]) -> float:
    from seqeval.metrics import f1_score

    return float(f1_score(golds, preds, zero_division=0))


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------
@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(pred: str, gold: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of one summary against its reference."""
    scores = _rouge_scorer().score(gold, pred)  # (target, prediction)
    return {"rouge_1": scores["rouge1"].fmeasure, "rouge_2": scores["rouge2"].fmeasure,
            "rouge_l": scores["rougeL"].fmeasure}


def bertscore_model() -> Path | None:
    """The local BERTScore model folder: $MELAMA_BERTSCORE_MODEL, else the paper's model if it is in the
    local Hugging Face cache, else None."""
    if os.environ.get(BERTSCORE_ENV):
        folder = Path(os.environ[BERTSCORE_ENV])
        if not (folder / "config.json").is_file():
            raise UserError(f"{BERTSCORE_ENV}={folder}: not a model folder (no config.json)")
        return folder
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(BERTSCORE_DEFAULT, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def bertscore_f1(preds: list[str], golds: list[str], model: Path) -> float:
    """Mean BERTScore F1; an empty prediction scores 0 (as bert-score documents, done here because
    bert-score 0.3.13's own handling of it fails under transformers 5)."""
    import bert_score
    import torch
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    layers = model2layers.get(model.name, config.num_hidden_layers)  # the paper's layer for its model
    scorer = bert_score.BERTScorer(model_type=str(model), num_layers=layers,
                                   device="cuda" if torch.cuda.is_available() else "cpu")
    # A tokenizer folder without model_max_length reports 1e30, which bert-score passes to truncation.
    limit = getattr(config, "max_position_embeddings", 512)
    scorer._tokenizer.model_max_length = min(scorer._tokenizer.model_max_length, limit)
    scored = [i for i, p in enumerate(preds) if p.strip()]
    f1 = [0.0] * len(preds)
    if scored:
        _, _, values = scorer.score([preds[i] for i in scored], [golds[i] for i in scored])
        for i, value in zip(scored, values.tolist()):
            f1[i] = value
    return sum(f1) / len(f1)
