"""What may be set side by side, and the change against the baseline: the data of report.json.

Perplexities are compared only when scored at the same seq_length with the same tokenizer (a
perplexity.json records it from phase 2 on: "tokenizer": {"path", "vocab_size", "vocab_hash"};
compared by vocabulary size and hash, the path may differ); scores only when `melama eval` ran
them under the same protocol (extractor, few-shot count, limit, new-token budget): the same records,
scored by the same rule. The prompt template is not part of it: it belongs to the model (`melama
eval` prompts each model in the template it was tuned with, a base model plainly), so a base and its
chat model are compared, the paper's comparison, each shown with its template. Inputs that differ
form their own group, shown apart with the reason; nothing is averaged. The
baseline's group comes first; the change is against the baseline, in its group only.
"""

from __future__ import annotations

import json
from pathlib import Path

from melama_mcore.errors import UserError
from melama_mcore.eval.tasks import TASKS
from melama_mcore.report.inputs import Input, PerplexityInput, PerplexityPoint, RunInput, ScoresInput
from melama_mcore.report.runs import series

FORMAT = "melama-report/1"
# The protocol fields that change what a score means; backend, model and the model's template may differ.
COMPARED_PROTOCOL = ("extractor", "num_fewshot", "limit", "max_new_tokens")


def report_data(inputs: list[Input], baseline: str | None) -> dict:
    """Everything the report shows, as plain JSON (report.json); numbers as read from the inputs."""
    baseline = choose_baseline(inputs, baseline)
    ppl = [i for i in inputs if isinstance(i, PerplexityInput)]
    groups = perplexity_groups(ppl, baseline)
    return {
        "format": FORMAT,
        "baseline": baseline,
        "inputs": [{"label": i.label, "kind": _KINDS[type(i)], "path": str(Path(i.path).resolve())} for i in inputs],
        "runs": [{"label": i.label, "path": str(Path(i.path).resolve()), "settings": i.settings, **series(i.curves)}
                 for i in inputs if isinstance(i, RunInput)],
        "perplexity": groups,
        "perplexity_series": [checkpoint_series(i, groups, baseline) for i in ppl if i.series],
        "scores": score_groups([i for i in inputs if isinstance(i, ScoresInput)], baseline),
    }


_KINDS = {RunInput: "run", PerplexityInput: "perplexity", ScoresInput: "scores"}


def choose_baseline(inputs: list[Input], baseline: str | None) -> str | None:
    """--baseline, else the first eval-ppl or melama eval input (runs are drawn, not compared)."""
    compared = [i.label for i in inputs if not isinstance(i, RunInput)]
    if baseline is None:
        return compared[0] if compared else None
    if baseline not in compared:
        known = ", ".join(dict.fromkeys(compared)) or "none"
        raise UserError(f"--baseline {baseline!r} is not the label of an eval-ppl or melama eval input (labels: {known})")
    return baseline


def _ordered(groups: dict, baseline: str | None) -> list[list]:
    """Groups in the order of their first member, the baseline's group first and the baseline first in it."""
    ordered = [sorted(members, key=lambda m: m.label != baseline) for members in groups.values()]
    ordered.sort(key=lambda members: members[0].label != baseline)
    return ordered


def _labels(members) -> str:
    return ", ".join(m.label for m in members)


# -- perplexity ---------------------------------------------------------------------------------------
def _tokenizer_key(point: PerplexityPoint):
    return None if point.tokenizer is None else (point.tokenizer.get("vocab_size"), point.tokenizer.get("vocab_hash"))


def _describe_tokenizer(point: PerplexityPoint) -> str:
    size, vocab_hash = _tokenizer_key(point)
    return f"vocab size {size}, hash {str(vocab_hash)[:12]}"


def perplexity_reason(point: PerplexityPoint, main: PerplexityPoint, main_labels: str) -> str:
    reasons = []
    if point.seq_length != main.seq_length:
        reasons.append(f"scored at seq_length {point.seq_length}, not {main.seq_length} as {main_labels}")
    if _tokenizer_key(point) != _tokenizer_key(main):
        if point.tokenizer is None:
            reasons.append(f"its perplexity.json does not record the tokenizer ({main_labels}'s do)")
        elif main.tokenizer is None:
            reasons.append(f"the perplexity.json of {main_labels} does not record the tokenizer (this one's does)")
        else:
            reasons.append(f"another tokenizer ({_describe_tokenizer(point)}; {main_labels}: {_describe_tokenizer(main)})")
    return "; ".join(reasons)


def percent_change(cell: dict | None, reference: dict | None) -> float | None:
    """Perplexity change in percent of the baseline's."""
    if not (cell and reference and reference["perplexity"]):
        return None
    return (cell["perplexity"] - reference["perplexity"]) / reference["perplexity"] * 100


def perplexity_groups(inputs: list[PerplexityInput], baseline: str | None) -> list[dict]:
    """The forgetting table's data: each input's perplexity per source (a checkpoint series: its
    last checkpoint), grouped by what makes perplexities comparable."""
    by_key: dict = {}
    for item in inputs:
        by_key.setdefault((item.last.seq_length, _tokenizer_key(item.last)), []).append(item)
    ordered = _ordered(by_key, baseline)
    main = ordered[0] if ordered else []
    out = []
    for number, members in enumerate(ordered):
        base = next((m for m in members if m.label == baseline), None)
        notes = []
        if members[0].last.tokenizer is None:
            notes.append("the tokenizer is not recorded in these perplexity.json files (written before eval-ppl "
                         "recorded it): that they share one is assumed, not checked")
        sources: dict[str, dict] = {}
        for item in members:
            for name, values in item.last.sources.items():
                cell = dict(values)
                reference = base.last.sources.get(name) if base is not None and item is not base else None
                cell["change_pct"] = percent_change(values, reference)
                sources.setdefault(name, {})[item.label] = cell
        for name, cells in sources.items():
            counts = {cell["tokens"] for cell in cells.values()}
            if len(counts) > 1:
                notes.append(f"source {name!r} was scored on different token counts ("
                             + ", ".join(f"{label} {cell['tokens']:,}" for label, cell in cells.items())
                             + "): not the same held-out text")
        out.append({
            "seq_length": members[0].last.seq_length,
            "tokenizer": members[0].last.tokenizer,
            "apart_reason": None if number == 0 else perplexity_reason(members[0].last, main[0].last, _labels(main)),
            "notes": notes,
            "baseline": base.label if base is not None else None,
            "models": [m.label for m in members],
            "checkpoints": {m.label: {"path": str(m.last.path), "checkpoint": m.last.checkpoint, "step": m.last.step,
                                      "series": m.series} for m in members},
            "sources": sources,
        })
    return out


def column_label(group: dict, label: str) -> str:
    """A model's name in the forgetting table and its picture: a checkpoint series names its step."""
    checkpoint = group["checkpoints"][label]
    return f"{label} (step {checkpoint['step']})" if checkpoint["series"] else label


def checkpoint_series(item: PerplexityInput, groups: list[dict], baseline: str | None) -> dict:
    """A folder of perplexity outputs, one per checkpoint: per source, perplexity against the step,
    with the change against the baseline when the baseline is comparable (in the same group)."""
    group = next(g for g in groups if item.label in g["models"])
    base = group["baseline"] if group["baseline"] != item.label else None
    names = list(dict.fromkeys(name for point in item.points for name in point.sources))
    sources = {}
    for name in names:
        cells = [point.sources.get(name) for point in item.points]
        reference = group["sources"].get(name, {}).get(base) if base else None
        sources[name] = {
            "loss": [c and c["loss"] for c in cells],
            "perplexity": [c and c["perplexity"] for c in cells],
            "tokens": [c and c["tokens"] for c in cells],
            "change_pct": None if reference is None else [percent_change(c, reference) for c in cells],
        }
    return {"label": item.label, "path": str(Path(item.path).resolve()), "baseline": base,
            "steps": [p.step for p in item.points], "files": [str(p.path) for p in item.points], "sources": sources,
            "baseline_perplexity": {name: group["sources"][name][base]["perplexity"] for name in names
                                    if base and base in group["sources"].get(name, {})}}


# -- scores -------------------------------------------------------------------------------------------
def template_text(template: dict | None) -> str:
    """How a model was prompted, for the report: the template's name and the start of its sha256 (the
    Jinja text decides every prompt; where it came from does not), or plain prompts."""
    template = template or {}
    name, sha = template.get("name"), template.get("sha256")
    return f"{name or 'plain prompts'}" + (f" (sha256 {sha[:12]})" if sha else "")


def _protocol_key(item: ScoresInput) -> str | None:
    if item.protocol is None:
        return None
    return json.dumps({k: item.protocol.get(k) for k in COMPARED_PROTOCOL}, sort_keys=True)


def _show(key: str, protocol: dict) -> str:
    value = protocol.get(key)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "none" if value is None else str(value)


def score_reason(item: ScoresInput, main: ScoresInput, main_labels: str) -> str:
    if item.protocol is None:
        return "its results.json records no protocol (written before melama eval recorded it)"
    if main.protocol is None:
        return f"the results.json of {main_labels} records no protocol (this one's does)"
    return "; ".join(f"{key} {_show(key, item.protocol)}, not {_show(key, main.protocol)} as {main_labels}"
                     for key in COMPARED_PROTOCOL if item.protocol.get(key) != main.protocol.get(key))


def _bertscore_scorer(item: ScoresInput) -> tuple:
    """The BERTScore model and layer a results.json's bertscore_f1 came from (None, None: not recorded)."""
    scorer = (item.protocol or {}).get("bertscore") or {}
    return scorer.get("model"), scorer.get("layer")


def _bertscore_notes(other_scorer: dict, base: ScoresInput | None, tasks: dict) -> list[str]:
    """Why a bertscore_f1 has no change: another BERTScore model or layer than the baseline's scored it."""
    scored = {label for t in tasks.values() for metric, by_label in t["metrics"].items()
              if metric.startswith("bertscore") for label, cell in by_label.items() if cell["value"] is not None}
    if base is None or base.label not in scored:
        return []
    base_model, base_layer = _bertscore_scorer(base)
    return [f"bertscore_f1 of {label} was scored with BERTScore {model} layer {layer}, not {base_model} layer "
            f"{base_layer} as {base.label}: its change is not shown"
            for label, (model, layer) in other_scorer.items() if label in scored]


def _task_order(names) -> list[str]:
    """MIBE's tasks in the paper's order, then the others as they came."""
    names = list(dict.fromkeys(names))
    return [t for t in TASKS if t in names] + [t for t in names if t not in TASKS]


def score_groups(inputs: list[ScoresInput], baseline: str | None) -> list[dict]:
    by_key: dict = {}
    for item in inputs:
        by_key.setdefault(_protocol_key(item), []).append(item)
    ordered = _ordered(by_key, baseline)
    main = ordered[0] if ordered else []
    out = []
    for number, members in enumerate(ordered):
        base = next((m for m in members if m.label == baseline), None)
        notes = []
        if members[0].protocol is None:
            notes.append("protocol not recorded (results.json written before melama eval recorded it): these "
                         "may not have been scored alike")
        tasks = {}
        other_scorer = {m.label: _bertscore_scorer(m) for m in members
                        if base is not None and m is not base and _bertscore_scorer(m) != _bertscore_scorer(base)}
        for task in _task_order(t for m in members for t in m.tasks):
            metric_names = list(dict.fromkeys(name for m in members for name in m.tasks.get(task, {})))
            metric_names.sort(key=lambda name: "@" in name)  # the other extractor's after the chosen one's
            metrics = {}
            for metric in metric_names:
                reference = base.tasks.get(task, {}).get(metric) if base is not None else None
                metrics[metric] = {}
                for m in members:
                    if metric not in m.tasks.get(task, {}):
                        continue
                    value = m.tasks[task][metric]
                    change = (value - reference if m is not base and value is not None and reference is not None
                              and not (metric.startswith("bertscore") and m.label in other_scorer) else None)
                    metrics[metric][m.label] = {"value": value, "change": change}
            tasks[task] = {"suite": "MIBE" if task in TASKS else "lm-eval",
                           "dataset": TASKS[task].dataset if task in TASKS else None, "metrics": metrics}
        out.append({
            "protocol": None if members[0].protocol is None else {k: members[0].protocol.get(k) for k in COMPARED_PROTOCOL},
            "apart_reason": None if number == 0 else score_reason(members[0], main[0], _labels(main)),
            "notes": notes + _bertscore_notes(other_scorer, base, tasks),
            "baseline": base.label if base is not None else None,
            "models": [m.label for m in members],
            "protocols": {m.label: m.protocol for m in members},
            "tasks": tasks,
            "diagnostics": {task: {m.label: m.diagnostics[task] for m in members if m.diagnostics.get(task)}
                            for task in tasks if any(m.diagnostics.get(task) for m in members)},
        })
    return out
