"""The functions the MIBE task YAMLs (lm_eval_tasks/) name: the dataset loader lm-eval calls with the
run's metadata, the per-record scoring (process_results) and the corpus-level aggregations.

Run settings reach the tasks as lm-eval metadata (`melama eval` sets them; with `lm_eval` pass
`--metadata '{"data_dir": "DIR", "chat": true, "extractor": "strict"}'`): `data_dir` (local records
instead of the Hub), `chat` (Me-LLaMA's chat wrapper around prompts) and `extractor`. lm-eval hands
only the record to process_results, so the loader writes the task name and extractor into each record.
"""

from __future__ import annotations

import logging
import math

from melama_mcore.errors import UserError
from melama_mcore.eval import metrics
from melama_mcore.eval.data import load_splits, with_prompts
from melama_mcore.eval.extraction import check_extractor, extract
from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER, TASKS

log = logging.getLogger(__name__)


def _flag(value) -> bool:
    """A boolean from lm-eval metadata (JSON true, or a string from a key=value argument)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def dataset(mibe_task: str, data_dir: str | None = None, chat=False, extractor: str = "strict", **_other_metadata):
    """`custom_dataset` of every MIBE task: {"test", "train"} splits of checked, prompted records."""
    import datasets

    if mibe_task not in TASKS:
        raise UserError(f"unknown MIBE task {mibe_task!r} in a task YAML")
    task = TASKS[mibe_task]
    splits = load_splits(task, data_dir)
    chat, extractor = _flag(chat), check_extractor(extractor)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(with_prompts(task, records, chat, extractor))
                                 for split, records in splits.items()})


def process_results(doc: dict, results: list[str]) -> dict:
    """One record's contribution to each metric: a value averaged over records, or what the corpus
    aggregation needs (prediction, gold)."""
    task, extractor = TASKS[doc["mibe_task"]], doc["mibe_extractor"]
    prediction = extract(task, doc, results[0], extractor)
    if task.kind == CHOICE:
        return {"accuracy": float(prediction == doc["gold"]), "macro_f1": (prediction, doc["gold"]),
                "missing_rate": float(prediction is None)}
    if task.kind == MULTILABEL:
        return {"macro_f1": (prediction, doc["gold"]), "missing_rate": float(prediction is None)}
    if task.kind == EXTRACTIVE_QA:
        compat = extractor == "mibe-compat"
        em, f1 = ((metrics.compat_exact_match, metrics.compat_token_f1) if compat
                  else (metrics.exact_match, metrics.token_f1))
        return {"exact_match": em(prediction, doc["answer"]), "token_f1": f1(prediction, doc["answer"])}
    if task.kind == NER:
        return {"entity_f1": (doc["label"], prediction)}
    return {**metrics.rouge(prediction, doc["answer"]), "bertscore_f1": (prediction, doc["answer"])}


# Corpus-level aggregations (lm-eval passes the list of per-record items).
def agg_macro_f1(items: list[tuple]) -> float:
    preds, golds = zip(*items)
    return metrics.macro_f1(list(preds), list(golds))


def agg_multilabel_macro_f1(items: list[tuple]) -> float:
    preds, golds = zip(*items)
    return metrics.multilabel_macro_f1(list(preds), list(golds))


def agg_entity_f1(items: list[tuple]) -> float:
    golds, preds = zip(*items)
    return metrics.entity_f1(list(golds), list(preds))


def agg_bertscore_f1(items: list[tuple]) -> float:
    model = metrics.bertscore_model()
    if model is None:
        log.warning("bertscore_f1 not computed: no local BERTScore model (set %s to a model folder, e.g. %s)",
                    metrics.BERTSCORE_ENV, metrics.BERTSCORE_DEFAULT)
        return math.nan
    preds, golds = zip(*items)
    return metrics.bertscore_f1(list(preds), list(golds), model)
