"""What `melama eval` writes: results.json, results.md (the paper's layout: dataset x metric) and,
with --log-samples, samples_<task>.jsonl. Every file appears atomically (written under a temporary
name, then renamed); results.json is written last, so its presence means the run completed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from melama_mcore.eval.extraction import extract
from melama_mcore.eval.tasks import ALL_METRICS, MULTILABEL, TASKS

GENERAL_NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm"}  # lm-eval's names -> ours


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _number(value) -> float | None:
    """A metric value for results.json: NaN (not computed) and lm-eval's 'N/A' become null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isnan(value) else float(value)
    return None


def collect(lm_results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's results -> {task: {metric: value}}. MIBE tasks keep their metric names; other tasks'
    `acc` becomes `accuracy`, and a filter other than `none` is appended (`exact_match_strict-match`).
    Standard errors are left out; groups without metrics of their own (mibe) too."""
    table = {}
    for task, values in lm_results["results"].items():
        row = {}
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            if task not in TASKS:
                metric = GENERAL_NAMES.get(metric, metric) + ("" if filter_name == "none" else f"_{filter_name}")
            row[metric] = _number(value)
        if row:
            table[task] = {m: row[m] for m in TASKS[task].metrics} if task in TASKS else row
    return table


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown(table: dict[str, dict], header: list[str], general: list[str]) -> str:
    """MIBE datasets as rows (in the paper's order) and metrics as columns; then the `general` lm-eval
    tasks, one row per metric."""
    lines = ["# Evaluation results", "", *header, ""]
    mibe = [t for t in TASKS if t in table]
    if mibe:
        columns = [m for m in ALL_METRICS if any(m in table[t] for t in mibe)]
        lines += ["| Task | Dataset | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for name in mibe:
            cells = [_cell(table[name][m]) if m in table[name] else "" for m in columns]
            lines.append(f"| {TASKS[name].task_type} | {TASKS[name].dataset} | " + " | ".join(cells) + " |")
        lines.append("")
    if general:
        lines += ["## lm-eval tasks", "", "| Task | Metric | Value |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {_cell(v)} |" for t in general for m, v in table[t].items()]
        lines.append("")
    return "\n".join(lines)


def sample_lines(task_name: str, samples: list[dict]) -> str:
    """samples_<task>.jsonl for a MIBE task: what the model was asked and said, what was extracted
    from it, and the gold answer (choice indices for one-label tasks and HoC, BIO tags for NER,
    text otherwise)."""
    task = TASKS[task_name]
    lines = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc, generation = sample["doc"], sample["resps"][0][0]
        gold = doc.get("gold", doc.get("label", doc["answer"]))
        if task.kind == MULTILABEL:
            gold = [i for i, hot in enumerate(gold) if hot]
        lines.append(json.dumps({"doc_id": sample["doc_id"], "prompt": sample["arguments"][0][0],
                                 "generation": generation,
                                 "prediction": extract(task, doc, generation, doc["mibe_extractor"]),
                                 "gold": gold}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_outputs(out: Path, table: dict, markdown_text: str, samples: dict[str, list] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task, task_samples in (samples or {}).items():
        if task in TASKS:
            write_atomic(out / f"samples_{task}.jsonl", sample_lines(task, task_samples))
    write_atomic(out / "results.md", markdown_text)
    write_atomic(out / "results.json", json.dumps(table, indent=2) + "\n")
