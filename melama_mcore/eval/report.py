"""What `melama eval` (and `melama eval rescore`) writes: results.json, results.md (the paper's layout:
dataset x metric, one table per extractor, then the counts and NER per entity type) and, with
--log-samples, samples_<task>.jsonl. Every file appears atomically (written under a temporary name,
then renamed); results.json is written last, so its presence means the run completed.

results.json: {"protocol": {...}, "<task>": {"<metric>": number | null, ...}, ...}; see
docs/evaluation.md for every field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from melama_mcore.eval import metrics
from melama_mcore.eval.scoring import COUNTS, TaskResult, other_extractor
from melama_mcore.eval.tasks import ALL_METRICS, MULTILABEL, NER, SUMMARY, TASKS
from melama_mcore.output_paths import write_atomic

GENERAL_NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm"}  # lm-eval's names -> ours
PROTOCOL = "protocol"  # results.json's one key that is not a task
UNKNOWN_TEMPLATE = {"name": None, "source": "unknown (rescored from samples files alone)"}
NER_DETAIL = ("entity_precision", "entity_recall", "entity_f1",
              "entity_precision_overlap", "entity_recall_overlap", "entity_f1_overlap")



def _number(value) -> float | None:
    """A metric value for results.json: NaN (not computed) and lm-eval's 'N/A' become null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isnan(value) else float(value)
    return None


def collect(lm_results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's results of its own (non-MIBE) tasks -> {task: {metric: value}}: `acc` becomes
    `accuracy`, and a filter other than `none` is appended (`exact_match_strict-match`). Standard
    errors are left out; groups without metrics of their own (mibe) too. MIBE tasks are scored by
    scoring.task_result instead."""
    table = {}
    for task, values in lm_results["results"].items():
        if task in TASKS:
            continue
        row = {}
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            row[GENERAL_NAMES.get(metric, metric) + ("" if filter_name == "none" else f"_{filter_name}")] = _number(value)
        if row:
            table[task] = row
    return table


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _mibe_table(table: dict, mibe: list[str], suffix: str) -> list[str]:
    columns = [m for m in ALL_METRICS if any(f"{m}{suffix}" in table[t] for t in mibe)]
    lines = ["| Task | Dataset | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name in mibe:
        cells = [_cell(table[name][f"{m}{suffix}"]) if f"{m}{suffix}" in table[name] else "" for m in columns]
        lines.append(f"| {TASKS[name].task_type} | {TASKS[name].dataset} | " + " | ".join(cells) + " |")
    return lines + [""]


def _ner_table(table: dict, tasks: list[str], extractor: str, suffix: str) -> list[str]:
    lines = [f"## NER by entity type ({extractor})", "",
             "| Dataset | Type | precision | recall | F1 | precision (overlap) | recall (overlap) | F1 (overlap) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in tasks:
        row = table[name]
        prefix = "entity_f1."
        types = sorted(k[len(prefix):len(k) - len(suffix)] for k in row
                       if k.startswith(prefix) and (k.endswith(suffix) if suffix else "@" not in k))
        for kind in ["", *types]:
            cells = [_cell(row.get(f"{m}{'.' + kind if kind else ''}{suffix}")) for m in NER_DETAIL]
            lines.append(f"| {TASKS[name].dataset} | {kind or 'all'} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(table: dict, header: list[str], general: list[str], extractor: str) -> str:
    """MIBE datasets as rows (in the paper's order) and metrics as columns, once per extractor (the
    run's first); the counts; NER per entity type; then the `general` lm-eval tasks, one row per metric."""
    other = other_extractor(extractor)
    lines = ["# Evaluation results", "", *header, ""]
    mibe = [t for t in TASKS if t in table]
    if mibe:
        lines += [f"## MIBE, {extractor} extractor (this run's protocol)", "", *_mibe_table(table, mibe, ""),
                  f"## MIBE, {other} extractor (results.json: `<metric>@{other}`)", "",
                  *_mibe_table(table, mibe, f"@{other}"),
                  "## Counts", "",
                  "| Dataset | " + " | ".join((*COUNTS, "extractor_disagreement")) + " |",
                  "|---|" + "---|" * (len(COUNTS) + 1)]
        lines += [f"| {TASKS[t].dataset} | " + " | ".join(_cell(table[t].get(c)) for c in (*COUNTS, "extractor_disagreement"))
                  + " |" for t in mibe]
        lines.append("")
        ner = [t for t in mibe if TASKS[t].kind == NER]
        if ner:
            lines += _ner_table(table, ner, extractor, "") + _ner_table(table, ner, other, f"@{other}")
    if general:
        lines += ["## lm-eval tasks", "", "| Task | Metric | Value |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {_cell(v)} |" for t in general for m, v in table[t].items()]
        lines.append("")
    return "\n".join(lines)


def _gold(task_name: str, doc: dict, prediction):
    """The gold answer in the form of the prediction: a choice index, a list of indices (HoC), the
    gold BIO tags as the extractor aligned them (NER), the reference text otherwise."""
    task = TASKS[task_name]
    if task.kind == NER:
        return prediction[1]
    if task.kind == MULTILABEL:
        return [i for i, hot in enumerate(doc["gold"]) if hot]
    return doc.get("gold", doc["answer"])


def sample_lines(task_name: str, result: TaskResult, extractor: str, prompts: list[str | None]) -> str:
    """samples_<task>.jsonl: per record (file order) its index in the task file, the prompt as sent,
    the generation, what each extractor read from it, the gold in the same form, the counts, and the
    record exactly as read from the task file (`doc`: what `melama eval rescore` reads, with
    `generation`)."""
    other = other_extractor(extractor)
    ner = TASKS[task_name].kind == NER
    lines = []
    for k, (record, prompt) in enumerate(zip(result.records, prompts)):
        chosen, second = result.predictions[extractor][k], result.predictions[other][k]
        lines.append(json.dumps({
            "doc_id": record.doc["mibe_index"], "prompt": prompt, "generation": record.generation,
            "prediction": chosen[0] if ner else chosen, f"prediction@{other}": second[0] if ner else second,
            "gold": _gold(task_name, record.doc, chosen),
            "prompt_tokens_cut": record.prompt_tokens_cut, "hit_max_new_tokens": record.hit_max_new_tokens,
            "doc": json.loads(record.doc["mibe_record"])}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def bertscore_protocol(table: dict) -> dict | None:
    """The BERTScore model and layer of a run with summaries (results.json's protocol.bertscore);
    None without a summary task or a local model."""
    if not any(name in TASKS and TASKS[name].kind == SUMMARY for name in table):
        return None
    model = metrics.bertscore_model()
    return model.describe() if model else None


def protocol_lines(protocol: dict) -> list[str]:
    """results.md's lines on how the numbers were made."""
    extractor, template = protocol["extractor"], protocol.get("template") or {}
    why = ("the released scorer's rules, for numbers comparable with Me-LLaMA's tables; what still differs: "
           "docs/evaluation.md" if extractor == "mibe-compat" else "an answer parser; not the paper's rules")
    unknown = template.get("source") == UNKNOWN_TEMPLATE["source"]
    lines = [f"- extractor: {extractor} ({why}); the {other_extractor(extractor)} extractor's numbers are in "
             f"their own table",
             "- prompts: " + (f"chat template {template['name']}" if template.get("name") else
                              "unknown" if unknown else "plain")
             + (", with a default system prompt" if template.get("system_prompt") is not None else "")
             + f" ({template.get('source')}"
             + (f"; sha256 {template['sha256']}" if template.get("sha256") else "") + ")",
             "- generation: " + ("unknown" if protocol.get("backend") is None else
                                 f"backend {protocol['backend']}, greedy, at most {protocol['max_new_tokens']} new "
                                 f"tokens, {protocol.get('num_fewshot') or 0}-shot; {protocol.get('selection')}")]
    bertscore = protocol.get("bertscore")
    if bertscore:
        lines.append(f"- BERTScore: {bertscore['model'] or bertscore['path']}, layer {bertscore['layer']} "
                     f"({bertscore['identified_by']})")
    return lines


def results_json(protocol: dict, table: dict) -> str:
    return json.dumps({PROTOCOL: protocol, **table}, indent=2, ensure_ascii=False) + "\n"


def write_outputs(out: Path, results_text: str, markdown_text: str, samples: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task, text in samples.items():
        write_atomic(out / f"samples_{task}.jsonl", text)
    write_atomic(out / "results.md", markdown_text)
    write_atomic(out / "results.json", results_text)
