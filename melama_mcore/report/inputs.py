"""The INPUTs of `melama report`, each one of three kinds, told apart by the file it holds:

    run          a training run's output folder: metrics.jsonl (runs.py), config.yaml of its latest checkpoint
    perplexity   a `melama eval-ppl` output: perplexity.json; or a folder of such outputs, one per
                 checkpoint (any sub-folder names; the step from each file's "step", else from the
                 sub-folder's trailing number: iter_0000200/, step_200/), read as one checkpoint series
    scores       a `melama eval` output: results.json ({task: {metric: value}} and a "protocol")

A path may also name the file itself. An input is labelled by --label, else by its folder's name;
labels name models, so an eval-ppl output and a `melama eval` output of one model may share one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.errors import UserError
from melama_mcore.report.runs import METRICS_FILE, RunCurves, read_run, run_settings

PERPLEXITY_FILE = "perplexity.json"
RESULTS_FILE = "results.json"
PROTOCOL_KEY = "protocol"  # results.json's one top-level key that is not a task
# Per-task counts of `melama eval` beside the metrics: how the generations went, not scores.
DIAGNOSTICS = ("extractor_disagreement", "truncated_prompts", "empty_generations", "hit_max_new_tokens")
KINDS_HELP = (f"a run folder ({METRICS_FILE}), an eval-ppl output ({PERPLEXITY_FILE}, or a folder of them per "
              f"checkpoint) or a melama eval output ({RESULTS_FILE})")


@dataclass
class RunInput:
    label: str
    path: Path
    curves: RunCurves
    settings: dict | None  # from the latest checkpoint's config.yaml; None without a checkpoint


@dataclass
class PerplexityPoint:
    """One perplexity.json. `step` and `tokenizer` are optional fields (older files have neither)."""

    path: Path
    checkpoint: str | None
    step: int | None
    seq_length: int
    tokenizer: dict | None  # {"path", "vocab_size", "vocab_hash"}
    sources: dict[str, dict]  # name -> {"loss", "perplexity", "tokens", "sequences"}


@dataclass
class PerplexityInput:
    label: str
    path: Path
    points: list[PerplexityPoint]  # one, or a checkpoint series in step order
    series: bool = False

    @property
    def last(self) -> PerplexityPoint:
        return self.points[-1]


@dataclass
class ScoresInput:
    label: str
    path: Path
    protocol: dict | None  # None: a results.json written before `melama eval` recorded its protocol
    tasks: dict[str, dict[str, float | None]]  # the metrics (the chosen extractor's, and "<metric>@<other>")
    diagnostics: dict[str, dict[str, float | None]]


Input = RunInput | PerplexityInput | ScoresInput


# -- reading ------------------------------------------------------------------------------------------
def read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}): rewrite it with "
                        "the command that made it") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_perplexity(path: Path) -> PerplexityPoint:
    data = read_json(path)

    def bad(what: str) -> UserError:
        return UserError(f"{path}: {what}: not a perplexity.json written by melama eval-ppl")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if not _count(data.get("seq_length")):
        raise bad("no integer 'seq_length'")
    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise bad("no 'sources' object")
    for name, values in sources.items():
        if not (isinstance(values, dict) and _number(values.get("loss")) and _number(values.get("perplexity"))
                and _count(values.get("tokens")) and _count(values.get("sequences"))):
            raise bad(f"source {name!r} lacks a number for loss, perplexity, tokens or sequences")
    step = data.get("step")
    if step is not None and not _count(step):
        raise bad("'step' is not a step number")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise bad("'tokenizer' is not an object")
    checkpoint = data.get("checkpoint")
    return PerplexityPoint(path=path, checkpoint=checkpoint if isinstance(checkpoint, str) else None, step=step,
                           seq_length=data["seq_length"], tokenizer=tokenizer,
                           sources={name: {k: values[k] for k in ("loss", "perplexity", "tokens", "sequences")}
                                    for name, values in sources.items()})


def _series_step(point: PerplexityPoint) -> int:
    if point.step is not None:
        return point.step
    found = re.search(r"(\d+)$", point.path.parent.name)
    if not found:
        raise UserError(f"{point.path} records no 'step' and its folder name ends in no number: cannot place it "
                        "in the checkpoint series (name the folder iter_<step> or step_<step>)")
    return int(found.group(1))


def read_perplexity_series(folder: Path, files: list[Path]) -> list[PerplexityPoint]:
    points = []
    for path in files:
        point = read_perplexity(path)
        point.step = _series_step(point)
        points.append(point)
    points.sort(key=lambda p: p.step)
    for a, b in zip(points, points[1:]):
        if a.step == b.step:
            raise UserError(f"{folder}: {a.path.parent.name} and {b.path.parent.name} are both step {a.step}: keep one")
    for point in points[1:]:
        if (point.seq_length, point.tokenizer) != (points[0].seq_length, points[0].tokenizer):
            raise UserError(f"{folder}: {point.path} was scored at another seq_length or tokenizer than "
                            f"{points[0].path}: not one checkpoint series; give them as separate inputs")
    return points


def read_scores(path: Path) -> tuple[dict | None, dict, dict]:
    data = read_json(path)

    def bad(what: str) -> UserError:
        return UserError(f"{path}: {what}: not a results.json written by melama eval")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    protocol = data.get(PROTOCOL_KEY)
    if protocol is not None and not isinstance(protocol, dict):
        raise bad(f"'{PROTOCOL_KEY}' is not an object")
    tasks, diagnostics = {}, {}
    for task, values in data.items():
        if task == PROTOCOL_KEY:
            continue
        if not isinstance(values, dict) or not all(v is None or _number(v) for v in values.values()):
            raise bad(f"task {task!r} is not an object of metric numbers")
        tasks[task] = {m: v for m, v in values.items() if m not in DIAGNOSTICS}
        diagnostics[task] = {m: v for m, v in values.items() if m in DIAGNOSTICS}
    if not tasks:
        raise bad("no task scores")
    return protocol, tasks, diagnostics


# -- what each path is --------------------------------------------------------------------------------
KIND_FILES = {"run": METRICS_FILE, "perplexity": PERPLEXITY_FILE, "scores": RESULTS_FILE}


def detect(path: Path) -> tuple[str, Path, list[Path]]:
    """(kind: a KIND_FILES key or "series", the folder that names it, the files to read)."""
    if not path.exists():
        raise UserError(f"{path} does not exist: expected {KINDS_HELP}")
    if path.is_file():
        kind = next((k for k, name in KIND_FILES.items() if path.name == name), None)
        if kind is None:
            raise UserError(f"{path} is not an input of melama report: expected {KINDS_HELP}")
        return kind, path.parent, [path]
    found = [kind for kind, name in KIND_FILES.items() if (path / name).is_file()]
    if len(found) > 1:
        names = " and ".join(KIND_FILES[k] for k in found)
        raise UserError(f"{path} holds both {names}: name the file you mean (e.g. {path / KIND_FILES[found[0]]})")
    if found:
        return found[0], path, [path / KIND_FILES[found[0]]]
    try:
        series = sorted(child / PERPLEXITY_FILE for child in path.iterdir()
                        if child.is_dir() and not child.name.startswith(".") and (child / PERPLEXITY_FILE).is_file())
    except OSError as err:
        raise UserError(f"{path}: cannot be listed ({err.strerror or err})") from None
    if series:
        return "series", path, series
    raise UserError(f"{path} is not an input of melama report: it holds no {METRICS_FILE}, {PERPLEXITY_FILE} or "
                    f"{RESULTS_FILE} (nor sub-folders with {PERPLEXITY_FILE}); expected {KINDS_HELP}")


def read_input(path: Path, label: str | None) -> Input:
    kind, folder, files = detect(path)
    label = label or folder.resolve().name or str(folder)
    if kind == "run":
        return RunInput(label, path, read_run(folder), run_settings(folder))
    if kind == "scores":
        protocol, tasks, diagnostics = read_scores(files[0])
        return ScoresInput(label, path, protocol, tasks, diagnostics)
    if kind == "series":
        return PerplexityInput(label, path, read_perplexity_series(folder, files), series=True)
    return PerplexityInput(label, path, [read_perplexity(files[0])])


def read_inputs(paths: list[Path], labels: list[str]) -> list[Input]:
    """Every input, read and checked; a label names one model per kind."""
    if len(labels) > len(paths):
        raise UserError(f"{len(labels)} --label values for {len(paths)} inputs: give at most one per input, in order")
    inputs = [read_input(path, labels[i] if i < len(labels) else None) for i, path in enumerate(paths)]
    seen: dict[tuple[type, str], Path] = {}
    for item in inputs:
        other = seen.setdefault((type(item), item.label), item.path)
        if other is not item.path:
            raise UserError(f"{other} and {item.path} are both labelled {item.label!r}: give each its own --label "
                            "(in the order of the inputs)")
    return inputs
