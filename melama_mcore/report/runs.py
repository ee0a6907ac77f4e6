"""A training run's metrics.jsonl as curves against tokens seen; a resumed run as one curve.

The trainer appends to <output_dir>/metrics.jsonl (components/metrics.py): a record per logged step
({"step", "loss", "lr", "tokens_per_s", "step_time_s", "mfu" when the GPU's peak is known, ...}) and
one per validation ({"step", "eval": {source: {"loss", "ppl"}}}). A run that resumes from its
checkpoint at step k appends again from step k+1, so the steps after k that the interrupted process
had logged appear twice: the later records replace them (they are what the resumed model trained).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from melama_mcore.errors import UserError

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunCurves:
    """One run's logged steps and validations, later segments replacing earlier ones, in step order."""

    train: list[dict]                   # the trainer's step records
    validation: list[dict]              # its {"step", "eval"} records
    segments: int = 1                   # 1 + the times the log went back to an earlier step (resumes that overlapped)
    superseded: int = 0                 # records replaced by a later one of the same or a later-logged step
    tokens_per_step: list[int] = field(default_factory=list)  # per train record: tokens of its step

    def tokens_at(self, step: int) -> int:
        """Tokens seen after `step`: each logged record's step size holds back to the previous record
        (a resume may change the batch size; between two logged steps it did not change)."""
        seen, previous = 0, 0
        for record, size in zip(self.train, self.tokens_per_step):
            if step <= record["step"]:
                return seen + (step - previous) * size
            seen += (record["step"] - previous) * size
            previous = record["step"]
        return seen + (step - previous) * self.tokens_per_step[-1]


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each non-blank line; a line that is not a metrics record is an error
    naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); the trainer writes "
                            "one JSON object per line: repair or delete that line") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or not (
                _is_validation(record.get("eval")) or _is_number(record.get("loss"))):
            raise UserError(f"{path}:{number}: not a metrics record (expected an integer 'step' with a 'loss' "
                            "or an 'eval' object)")
        if "eval" not in record and not (_is_number(record.get("tokens_per_s")) and _is_number(record.get("step_time_s"))):
            raise UserError(f"{path}:{number}: step record without tokens_per_s and step_time_s: not written by "
                            "melama's trainer")
        records.append((number, record))
    return records


def merge_segments(records: list[dict]) -> RunCurves:
    """The run as one curve. A step record at or before the last logged step starts a new segment
    (the process resumed from an earlier checkpoint, or the folder was reused): every record of that
    step and later is dropped for it. A validation at a step already validated replaces the earlier
    one (the final validation repeats the periodic one at the last step)."""
    curves = RunCurves(train=[], validation=[])
    for record in records:
        step = record["step"]
        if "eval" in record:
            kept = [r for r in curves.validation if r["step"] < step]
            curves.superseded += len(curves.validation) - len(kept)
            curves.validation = kept + [record]
            continue
        if curves.train and curves.train[-1]["step"] >= step:
            curves.segments += 1
            train = [r for r in curves.train if r["step"] < step]
            validation = [r for r in curves.validation if r["step"] < step]
            curves.superseded += len(curves.train) - len(train) + len(curves.validation) - len(validation)
            curves.train, curves.validation = train, validation
        curves.train.append(record)
    curves.tokens_per_step = [round(r["tokens_per_s"] * r["step_time_s"]) for r in curves.train]
    return curves


def read_run(folder: Path) -> RunCurves:
    path = folder / METRICS_FILE
    curves = merge_segments([record for _, record in read_records(path)])
    if not curves.train:
        raise UserError(f"{path}: no training step logged yet (an empty run): train it first, or leave it out")
    return curves


def run_settings(folder: Path) -> dict | None:
    """What the report shows of a run's configuration, from its latest checkpoint's config.yaml; None
    when the run has no checkpoint yet (its curves need none: metrics.jsonl records the step sizes)."""
    from melama_mcore.checkpoint.layout import CONFIG, find_checkpoint

    try:
        config = yaml.safe_load((find_checkpoint(folder) / CONFIG).read_text(encoding="utf-8"))
    except (UserError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None

    def get(section: str, key: str):
        value = (config.get(section) or {}).get(key) if isinstance(config.get(section), dict) else None
        return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None

    return {
        "run_name": config.get("run_name") if isinstance(config.get("run_name"), str) else None,
        "preset": get("model", "preset"),
        "seq_length": get("training", "seq_length"),
        "global_batch_size": get("training", "global_batch_size"),
        "train_iters": get("training", "train_iters"),
        "tokenizer": get("data", "tokenizer"),
        "peft": get("peft", "method"),
    }


def series(curves: RunCurves) -> dict:
    """The run's curves as report.json holds them: one list per quantity, in step order."""
    train = curves.train
    tokens = [curves.tokens_at(r["step"]) for r in train]
    validation: dict[str, dict[str, list]] = {}
    for record in curves.validation:
        for source, values in record["eval"].items():
            out = validation.setdefault(source, {"step": [], "tokens": [], "loss": [], "perplexity": []})
            out["step"].append(record["step"])
            out["tokens"].append(curves.tokens_at(record["step"]))
            out["loss"].append(_finite(values.get("loss")))
            out["perplexity"].append(_finite(values.get("ppl")))
    return {
        "segments": curves.segments,
        "superseded_records": curves.superseded,
        "train": {
            "step": [r["step"] for r in train],
            "tokens": tokens,
            "loss": [_finite(r["loss"]) for r in train],
            "lr": [_finite(r.get("lr")) for r in train],
            "tokens_per_s": [_finite(r["tokens_per_s"]) for r in train],
            "mfu": [_finite(r.get("mfu")) for r in train],
            "skipped": [bool(r.get("skipped", False)) for r in train],
        },
        "validation": validation,
    }


def _is_validation(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> float | None:
    """A number for report.json (strict JSON): a non-finite or missing value (a skipped step's loss,
    MFU on a GPU of unknown peak) is null."""
    return float(value) if _is_number(value) and math.isfinite(value) else None
