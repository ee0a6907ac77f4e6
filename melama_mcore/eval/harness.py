"""The functions the MIBE task YAMLs (lm_eval_tasks/) name: the dataset loader lm-eval calls with the
run's metadata, the per-record results (process_results) and the corpus-level aggregations.

Run settings reach the tasks as lm-eval metadata (`melama eval` sets them; with `lm_eval` pass
`--metadata '{"data_dir": "DIR", "extractor": "mibe-compat"}'`): `data_dir` (local records instead of
the Hub) and `extractor` (which also orders the test records: under `mibe-compat` in the released
evaluator's seed-42 order, so `--limit N` takes the records it took). lm-eval hands only the record
to process_results, so the loader writes the task name and extractor into each record. Every metric
is computed by scoring.score on the (record, output) pairs, the same function `melama eval` uses.
"""

from __future__ import annotations

from melama_mcore.errors import UserError
from melama_mcore.eval import scoring
from melama_mcore.eval.data import load_splits, prepared, released_order
from melama_mcore.eval.extraction import DEFAULT_EXTRACTOR, check_extractor
from melama_mcore.eval.tasks import TASKS


def dataset(mibe_task: str, data_dir: str | None = None, extractor: str = DEFAULT_EXTRACTOR, **_other_metadata):
    """`custom_dataset` of every MIBE task: {"test", "train"} splits of checked, prompted records, the
    test records in the order `--limit` takes them from (see the module doc)."""
    import datasets

    if mibe_task not in TASKS:
        raise UserError(f"unknown MIBE task {mibe_task!r} in a task YAML")
    task = TASKS[mibe_task]
    splits = load_splits(task, data_dir)
    extractor = check_extractor(extractor)
    test = prepared(task, splits["test"], extractor)
    if extractor == "mibe-compat":
        test = [test[i] for i in released_order(len(test))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test),
                                 "train": datasets.Dataset.from_list(prepared(task, splits["train"], extractor))})


def process_results(doc: dict, results: list[str]) -> dict:
    """The record and its output, for each of the task's metrics (all are computed over the corpus)."""
    return {metric: (doc, results[0]) for metric in TASKS[doc["mibe_task"]].metrics}


def _aggregate(metric: str, items: list[tuple[dict, str]]) -> float:
    docs, generations = [d for d, _ in items], [g for _, g in items]
    value = scoring.score(TASKS[docs[0]["mibe_task"]], docs, generations, docs[0]["mibe_extractor"])[metric]
    return float("nan") if value is None else value


# The YAMLs' `aggregation: !function melama_mcore.eval.harness.agg_<metric>`, one per headline metric
# (tasks.ALL_METRICS; a test checks the YAMLs name these).
def agg_accuracy(items: list[tuple[dict, str]]) -> float:
    return _aggregate("accuracy", items)


def agg_macro_f1(items: list[tuple[dict, str]]) -> float:
    return _aggregate("macro_f1", items)


def agg_missing_rate(items: list[tuple[dict, str]]) -> float:
    return _aggregate("missing_rate", items)


def agg_exact_match(items: list[tuple[dict, str]]) -> float:
    return _aggregate("exact_match", items)


def agg_token_f1(items: list[tuple[dict, str]]) -> float:
    return _aggregate("token_f1", items)


def agg_entity_f1(items: list[tuple[dict, str]]) -> float:
    return _aggregate("entity_f1", items)


def agg_rouge_1(items: list[tuple[dict, str]]) -> float:
    return _aggregate("rouge_1", items)


def agg_rouge_2(items: list[tuple[dict, str]]) -> float:
    return _aggregate("rouge_2", items)


def agg_rouge_l(items: list[tuple[dict, str]]) -> float:
    return _aggregate("rouge_l", items)


def agg_bertscore_f1(items: list[tuple[dict, str]]) -> float:
    return _aggregate("bertscore_f1", items)
