"""A MIBE task's scores from its records and generated outputs: the metrics under one extractor, the
row results.json keeps (both extractors, their disagreement, the counts that explain a score).

The one place MIBE scores are computed: `melama eval`, `melama eval rescore` and lm-eval's own
aggregations (harness.py, for `lm_eval` users) all call `score`, so a run and its rescoring agree
exactly. Records are scored in the order of their task file (`mibe_index`), whatever order they
were generated or listed in.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from melama_mcore.eval import metrics
from melama_mcore.eval.extraction import EXTRACTORS, check_extractor, extract
from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER, MibeTask

log = logging.getLogger(__name__)

COUNTS = ("records", "truncated_prompts", "max_prompt_tokens_cut", "empty_generations", "hit_max_new_tokens")


def other_extractor(extractor: str) -> str:
    return next(e for e in EXTRACTORS if e != check_extractor(extractor))


@dataclass
class Generated:
    """One record and what the model made of it."""
    doc: dict         # a checked record (data.check_record) with `mibe_index`, its position in the task file
    generation: str
    prompt_tokens_cut: int | None = None    # tokens cut from the prompt's left to fit the context; None: unknown
    hit_max_new_tokens: bool | None = None  # stopped by the generation budget, not by end-of-sequence


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def score(task: MibeTask, docs: list[dict], generations: list[str], extractor: str) -> dict[str, float | None]:
    """{metric: value} of the task's outputs under `extractor` (its headline metrics first)."""
    pairs = sorted(zip(docs, generations), key=lambda pair: pair[0]["mibe_index"])
    docs, generations = [d for d, _ in pairs], [g for _, g in pairs]
    predictions = [extract(task, d, g, extractor) for d, g in pairs]
    return _metrics(task, docs, generations, predictions, extractor)


def _metrics(task: MibeTask, docs: list[dict], generations: list[str], predictions: list,
             extractor: str) -> dict[str, float | None]:
    if task.kind == CHOICE:
        golds = [d["gold"] for d in docs]
        return {"accuracy": metrics.accuracy(predictions, golds), "macro_f1": metrics.macro_f1(predictions, golds),
                "missing_rate": metrics.missing_rate(predictions)}
    if task.kind == MULTILABEL:
        return {"macro_f1": metrics.multilabel_macro_f1(predictions, [d["gold"] for d in docs]),
                "missing_rate": metrics.missing_rate(predictions)}
    if task.kind == EXTRACTIVE_QA:
        compat = extractor == "mibe-compat"
        em, f1 = ((metrics.compat_exact_match, metrics.compat_token_f1) if compat
                  else (metrics.exact_match, metrics.token_f1))
        return {"exact_match": _mean(em(p, d["answer"]) for p, d in zip(predictions, docs)),
                "token_f1": _mean(f1(p, d["answer"]) for p, d in zip(predictions, docs))}
    if task.kind == NER:
        preds, golds = [p for p, _ in predictions], [g for _, g in predictions]
        return {"entity_f1": metrics.entity_f1(golds, preds), **metrics.entity_details(golds, preds),
                "unaligned_records": sum(not g for g in golds)}
    rouge = [metrics.rouge(p, d["answer"]) for p, d in zip(predictions, docs)]
    return {**{m: _mean(r[m] for r in rouge) for m in ("rouge_1", "rouge_2", "rouge_l")},
            "bertscore_f1": _bertscore(predictions, [d["answer"] for d in docs])}


def _bertscore(predictions: list[str], references: list[str]) -> float | None:
    model = metrics.bertscore_model()
    if model is None:
        _warn_no_bertscore_model()
        return None
    return metrics.bertscore_f1(predictions, references, model)


@functools.cache
def _warn_no_bertscore_model() -> None:
    log.warning("bertscore_f1 not computed: no local BERTScore model (set %s to a model folder, e.g. %s)",
                    metrics.BERTSCORE_ENV, metrics.BERTSCORE_DEFAULT)


def _decision(task: MibeTask, prediction):
    """What two extractors are compared on for one record: the extracted answer; for NER the
    record's exact-match entity counts (true positives, predicted, gold), as the two rules tokenise
    differently."""
    if task.kind == NER:
        return metrics.entity_counts(prediction[1], prediction[0])
    return prediction


def _count(values: list) -> int | None:
    return None if any(v is None for v in values) else int(sum(values))


@dataclass
class TaskResult:
    row: dict[str, float | None]  # what results.json keeps for the task
    predictions: dict[str, list]  # per extractor, per record (file order)
    records: list[Generated]      # file order


def task_result(task: MibeTask, records: list[Generated], extractor: str) -> TaskResult:
    """The task's row of results.json: `extractor`'s metrics under their names, the other extractor's
    as `<metric>@<other>`, `extractor_disagreement` (the share of records whose extracted answer
    differs) and the counts (records, truncated prompts and the most tokens cut from one, empty
    generations, generations stopped by the budget)."""
    other = other_extractor(extractor)
    records = sorted(records, key=lambda r: r.doc["mibe_index"])
    docs, generations = [r.doc for r in records], [r.generation for r in records]
    predictions = {e: [extract(task, d, g, e) for d, g in zip(docs, generations)] for e in (extractor, other)}
    chosen = _metrics(task, docs, generations, predictions[extractor], extractor)
    second = _metrics(task, docs, generations, predictions[other], other)
    differs = [_decision(task, a) != _decision(task, b) for a, b in zip(predictions[extractor], predictions[other])]
    cuts = [r.prompt_tokens_cut for r in records]
    row = {**chosen, **{f"{m}@{other}": v for m, v in second.items()},
           "extractor_disagreement": _mean(differs),
           "records": len(records),
           "truncated_prompts": _count([None if c is None else c > 0 for c in cuts]),
           "max_prompt_tokens_cut": None if None in cuts else max(cuts),
           "empty_generations": sum(not g.strip() for g in generations),
           "hit_max_new_tokens": _count([r.hit_max_new_tokens for r in records])}
    return TaskResult({k: _number(v) for k, v in row.items()}, predictions, records)


def _number(value) -> float | int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value
