"""MIBE's metrics over lists of extracted predictions, computed with the field's libraries.

- accuracy, missing_rate: shares of records. A missing prediction (None) is wrong.
- macro_f1 (one label): scikit-learn's macro F1 over the labels that occur in the gold answers, as
  the released scorer computes it; a missing prediction counts against its gold label's recall.
- macro_f1 (HoC): scikit-learn's macro F1 over the multi-hot label matrix (every label a column).
- exact_match, token_f1 (EmrQA): `strict` is SQuAD's (lower-case, no punctuation or articles, bag of
  words); `mibe-compat` is the released scorer's: lower-case, punctuation removed, and *characters*
  as tokens (its normaliser joins characters with spaces), token F1 on the set of shared characters.
- entity_f1: seqeval's entity-level (micro) F1: an entity counts only with exact boundaries and type;
  beside it precision and recall, the same three with overlap matching (an entity counts when it
  shares a token with one of the same type on the other side), and all six per entity type.
- rouge_1, rouge_2, rouge_l: rouge-score F-measures (default tokenizer, no stemming, ROUGE-L
  without sentence splitting), averaged over records. (The paper's HF `evaluate` ROUGE reports the
  median of a bootstrap of that average instead: the same up to resampling noise.)
- bertscore_f1: bert-score F1 averaged over records, with the model of MELAMA_BERTSCORE_MODEL (a
  local folder; the paper used bert-base-multilingual-cased), else that model if it is in the local
  Hugging Face cache; nothing is downloaded. Without a model it is not computed (null). The layer is
  the one bert-score uses for the model's identity (bert-base-multilingual-cased: 9), found from its
  config or the Hugging Face cache's name for it, never from the folder's own name.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.errors import UserError

log = logging.getLogger(__name__)

BERTSCORE_ENV = "MELAMA_BERTSCORE_MODEL"
BERTSCORE_DEFAULT = "bert-base-multilingual-cased"  # the paper's model
BERTSCORE_HUB_NAMES = (BERTSCORE_DEFAULT, f"google-bert/{BERTSCORE_DEFAULT}")  # its names on the Hub
# The paper's model told by its config, for a copy whose config carries no name: its architecture,
# vocabulary (multilingual cased: 119547) and size.
BERTSCORE_DEFAULT_CONFIG = {"model_type": "bert", "vocab_size": 119547, "hidden_size": 768, "num_hidden_layers": 12}
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


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def entity_counts(gold: list[str], pred: list[str]) -> tuple[int, int, int]:
    """One record's (exactly matched, predicted, gold) entity counts."""
    from seqeval.metrics.sequence_labeling import get_entities

    gold_entities, pred_entities = set(get_entities(gold)), set(get_entities(pred))
    return len(gold_entities & pred_entities), len(pred_entities), len(gold_entities)


def entity_details(golds: list[list[str]], preds: list[list[str]]) -> dict[str, float]:
    """Entity precision, recall and F1, with exact-boundary and with overlap matching, over all types
    (micro) and per type of the gold entities: `entity_precision`, `entity_recall`, `entity_f1_overlap`,
    ..., `entity_f1.problem`, `entity_recall_overlap.test`, ... Entities are seqeval's chunks of the BIO
    tags (so `entity_f1` equals seqeval's); 0 where a count is zero."""
    from seqeval.metrics.sequence_labeling import get_entities

    counts = collections.defaultdict(lambda: collections.Counter())  # type -> gold, pred, exact, hit_gold, hit_pred
    for gold, pred in zip(golds, preds):
        gold_entities, pred_entities = set(get_entities(gold)), set(get_entities(pred))
        for kind, start, end in gold_entities:
            counts[kind]["gold"] += 1
            counts[kind]["hit_gold"] += any(k == kind and s <= end and start <= e for k, s, e in pred_entities)
        for kind, start, end in pred_entities:
            counts[kind]["pred"] += 1
            counts[kind]["exact"] += (kind, start, end) in gold_entities
            counts[kind]["hit_pred"] += any(k == kind and s <= end and start <= e for k, s, e in gold_entities)
    total = sum(counts.values(), collections.Counter())
    out = {}
    for suffix, c in (("", total), *((f".{kind}", counts[kind]) for kind in sorted(counts) if counts[kind]["gold"])):
        for match, hits_pred, hits_gold in (("", "exact", "exact"), ("_overlap", "hit_pred", "hit_gold")):
            precision = c[hits_pred] / c["pred"] if c["pred"] else 0.0
            recall = c[hits_gold] / c["gold"] if c["gold"] else 0.0
            out[f"entity_precision{match}{suffix}"] = precision
            out[f"entity_recall{match}{suffix}"] = recall
            out[f"entity_f1{match}{suffix}"] = _f1(precision, recall)
    return out


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


@dataclass(frozen=True)
class BertScoreModel:
    path: Path            # the local model folder
    name: str | None      # the name bert-score knows it by; None when not identified
    layer: int            # the hidden layer whose embeddings are compared
    identified_by: str    # how `name` was found: config name, Hugging Face cache, config; or unidentified

    def describe(self) -> dict:
        """What results.json records."""
        return {"model": self.name, "path": str(self.path), "layer": self.layer, "identified_by": self.identified_by}


def _hub_cache_name(folder: Path) -> str | None:
    """The repository id of a folder in the Hugging Face cache layout,
    `.../models--ORG--NAME/snapshots/<commit>/`: the name the model was downloaded by."""
    for part in reversed(folder.resolve().parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def identify_bertscore_model(folder: Path) -> BertScoreModel:
    """The model's identity and bert-score's layer for it: the name in its config (`_name_or_path`),
    else the Hugging Face cache's name for its folder, else the paper's model recognised by its config;
    a name bert-score knows gives its layer (bert-score's table), an unidentified model its last layer."""
    from bert_score.utils import model2layers

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder / 'config.json'}: cannot read the BERTScore model's config ({type(err).__name__})") from None
    depth = config.get("num_hidden_layers")

    def known(name: str | None) -> str | None:
        if not name:
            return None
        return next((n for n in (name, name.split("/")[-1]) if n in model2layers), None)

    found = [(known(config.get("_name_or_path")), "config name"), (known(_hub_cache_name(folder)), "Hugging Face cache"),
             (BERTSCORE_DEFAULT if all(config.get(k) == v for k, v in BERTSCORE_DEFAULT_CONFIG.items()) else None, "config")]
    name, how = next(((n, h) for n, h in found if n), (None, "unidentified: its last layer"))
    layer = model2layers[name] if name else depth
    if not isinstance(layer, int) or not isinstance(depth, int) or not 0 < layer <= depth:
        raise UserError(f"BERTScore model {folder}: identified as {name or 'an unknown model'} ({how}), whose layer "
                        f"{layer} it does not have ({depth} hidden layers in its config.json)")
    return BertScoreModel(folder, name, layer, how)


def bertscore_model() -> BertScoreModel | None:
    """The local BERTScore model: $MELAMA_BERTSCORE_MODEL, else the paper's model if it is in the local
    Hugging Face cache, else None."""
    if os.environ.get(BERTSCORE_ENV):
        folder = Path(os.environ[BERTSCORE_ENV])
        if not (folder / "config.json").is_file():
            raise UserError(f"{BERTSCORE_ENV}={folder}: not a model folder (no config.json)")
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = next((c for c in (try_to_load_from_cache(n, "config.json") for n in BERTSCORE_HUB_NAMES)
                       if isinstance(c, str)), None)
        if cached is None:
            return None
        folder = Path(cached).parent
    model = identify_bertscore_model(folder)
    if model.name is None:
        _warn_once(f"{folder}: not a model bert-score knows (neither its config nor a Hugging Face cache name "
                   f"says which), so its last layer ({model.layer}) is used: bertscore_f1 is not comparable with "
                   f"the paper's ({BERTSCORE_DEFAULT}, layer 9)")
    return model


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def bertscore_f1(preds: list[str], golds: list[str], model: BertScoreModel) -> float:
    """Mean BERTScore F1; an empty prediction scores 0 (as bert-score documents, done here because
    bert-score 0.3.13's own handling of it fails under transformers 5)."""
    return _bertscore_f1(tuple(preds), tuple(golds), model)


@functools.lru_cache(maxsize=4)  # one run scores the same summaries for both extractors and for lm-eval
def _bertscore_f1(preds: tuple[str, ...], golds: tuple[str, ...], model: BertScoreModel) -> float:
    import bert_score
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.path)
    scorer = bert_score.BERTScorer(model_type=str(model.path), num_layers=model.layer,
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
