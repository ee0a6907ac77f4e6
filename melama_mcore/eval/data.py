"""MIBE test records: read from the Hugging Face Hub or from local files, checked against the released
schema, and given the prompt and few-shot target the task YAMLs use.

Local files (`--data-dir DIR`): `DIR/<task>.jsonl` (or `.json`, `.parquet`) holds the test records;
`DIR/<task>_train.jsonl` (same suffixes), if present, the examples `--num-fewshot` draws from.
Records are the released schema: `query` (the full instruction and input), `answer` (the reference
text), `choices` and `gold` (an index; multi-hot over `choices` for HoC). NER records carry the gold
as HTML spans in `answer` (the released form) and/or as `token` and `label` (BIO tags) lists. Errors
name the file and line, never the record's text (it may be patient text).

Order: the test records are evaluated in the order of the file, or under `mibe-compat` in the order
of the released evaluator, which shuffles the test records with `random.Random(42)` before `--limit`
takes the first N (`released_order`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from melama_mcore.errors import DataError
from melama_mcore.eval.extraction import html_to_tokens, spans_to_html
from melama_mcore.eval.tasks import CHOICE, MULTILABEL, NER, MibeTask

RELEASED_SEED = 42  # the released evaluator's shuffle of the test records

SUFFIXES = (".jsonl", ".json", ".parquet")
BIO_TAG = re.compile(r"^(O|[BI]-\S+)$")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def find_file(data_dir: Path, stem: str) -> Path | None:
    return next((data_dir / f"{stem}{s}" for s in SUFFIXES if (data_dir / f"{stem}{s}").is_file()), None)


def _jsonl(path: Path, data: bytes) -> list[tuple[str, object]]:
    records = []
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
        if text.strip():
            try:
                records.append((f"{path}:{lineno}", json.loads(text)))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON") from None
    return records


def read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSONL, JSON (a list of records, or JSON Lines) or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except OSError as err:
            raise DataError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None
        except Exception as err:  # pyarrow raises its own error types for damaged files
            raise DataError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    if path.suffix == ".json":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            lineno = data.count(b"\n", 0, err.start) + 1
            raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            return _jsonl(path, data)  # JSON Lines under a .json name, as `datasets` also accepts
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records (or one JSON object per line)")
        return [(f"{path} record {i}", row) for i, row in enumerate(records)]
    return _jsonl(path, data)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_record(task: MibeTask, record: object, where: str) -> dict:
    """The record's fields this task uses, after checking them; raises DataError naming `where`.
    NER records come out with both forms of the gold: `answer` (HTML spans) and `token`/`label`."""
    need = task.kind.fields
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(need)}")
    missing = [f for f in need if f not in record]
    if missing:
        raise DataError(f"{where}: no field {missing[0]!r} ({task.name} records need {', '.join(need)})")

    def bad(field: str, what: str):
        return DataError(f"{where}: field {field!r} must be {what} ({task.name})")

    if not isinstance(record["query"], str) or not record["query"].strip():
        raise bad("query", "a non-empty string")
    answer = record.get("answer", "")
    if answer is None:
        answer = ""
    if not isinstance(answer, str):
        raise bad("answer", "a string")
    out = {"query": record["query"], "answer": answer}
    if task.kind in (CHOICE, MULTILABEL):
        choices, gold = record["choices"], record["gold"]
        if not _is_strings(choices) or len(choices) < (2 if task.kind == CHOICE else 1) or "" in choices:
            raise bad("choices", "a list of at least two non-empty strings" if task.kind == CHOICE
                      else "a list of non-empty strings")
        if task.kind == CHOICE and not (_is_int(gold) and 0 <= gold < len(choices)):
            raise bad("gold", f"an index into 'choices' (0..{len(choices) - 1})")
        if task.kind == MULTILABEL and not (isinstance(gold, list) and len(gold) == len(choices)
                                            and all(_is_int(g) and g in (0, 1) for g in gold)):
            raise bad("gold", f"a multi-hot list of {len(choices)} zeros and ones, one per choice")
        out.update(choices=choices, gold=gold)
    elif task.kind == NER:
        out.update(_ner_gold(task, record, answer, bad, where))
    elif not answer.strip():
        raise bad("answer", "a non-empty string")
    return out


def _ner_gold(task: MibeTask, record: dict, answer: str, bad, where: str) -> dict:
    """An NER record's gold in both forms: `token`/`label` as given or read from the `answer` HTML;
    `answer` as given or written from `token`/`label`."""
    if "token" in record or "label" in record:
        tokens, labels = record.get("token"), record.get("label")
        if not _is_strings(tokens) or not tokens:
            raise bad("token", "a non-empty list of strings")
        if not _is_strings(labels) or len(labels) != len(tokens) or not all(BIO_TAG.match(t) for t in labels):
            raise bad("label", "a list of BIO tags (O, B-TYPE, I-TYPE), one per token")
        return {"token": tokens, "label": labels, "answer": answer or spans_to_html(tokens, labels)}
    if not answer.strip():
        raise DataError(f"{where}: no gold entities: {task.name} records need 'answer' (the sentence with HTML "
                        "entity spans, as released) or 'token' and 'label'")
    tokens, labels = html_to_tokens(answer)
    if not tokens:
        raise bad("answer", "HTML with words in it")
    return {"token": tokens, "label": labels}


def target_text(task: MibeTask, record: dict) -> str:
    """The answer a few-shot example shows: the record's `answer`, else one built from its gold."""
    if record["answer"]:
        return record["answer"]
    if task.kind == CHOICE:
        return record["choices"][record["gold"]]
    return ", ".join(c for c, g in zip(record["choices"], record["gold"]) if g) or "none"  # HoC; others need one


# ---------------------------------------------------------------------------------------------
# Loading a task's splits
# ---------------------------------------------------------------------------------------------
def _hub_splits(task: MibeTask) -> dict[str, list[tuple[str, object]]]:
    """The task's public test set (and train split, if the repository has one) from the Hub."""
    if task.hub is None:
        raise DataError(f"{task.name}: {task.dataset} is not public (data-use agreement): "
                        f"pass --data-dir DIR with {task.name}.jsonl")
    try:
        import datasets

        loaded = datasets.load_dataset(task.hub)
    except Exception as err:  # offline, not cached, no access: datasets raises many types
        first = (str(err).splitlines() or [""])[0][:200]
        raise DataError(f"{task.name}: cannot load {task.hub} from the Hugging Face Hub ({type(err).__name__}: "
                        f"{first}); download it, or pass --data-dir DIR with {task.name}.jsonl") from None
    if "test" not in loaded:
        raise DataError(f"{task.hub} has no test split (it has {', '.join(loaded)})")
    return {split: [(f"{task.hub} {split} record {i}", r) for i, r in enumerate(loaded[split])]
            for split in ("test", "train") if split in loaded}


def _local_splits(task: MibeTask, data_dir: Path) -> dict[str, list[tuple[str, object]]]:
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    test = find_file(data_dir, task.name)
    if test is None:
        raise DataError(f"{data_dir / (task.name + '.jsonl')} not found (also looked for .json and .parquet): "
                        f"the {task.dataset} test records")
    splits = {"test": read_records(test)}
    if not splits["test"]:
        raise DataError(f"{test} has no records")
    train = find_file(data_dir, f"{task.name}_train")
    if train is not None:
        splits["train"] = read_records(train)
    return splits


def load_splits(task: MibeTask, data_dir: str | Path | None) -> dict[str, list[tuple[object, dict]]]:
    """{"test": [...], "train": [...]} of (record as read, checked record) pairs, in file order
    (train empty when there is none)."""
    raw = _local_splits(task, Path(data_dir)) if data_dir else _hub_splits(task)
    return {split: [(record, check_record(task, record, where)) for where, record in raw.get(split, [])]
            for split in ("test", "train")}


def released_order(count: int) -> list[int]:
    """The order in which the released evaluator takes `count` test records: `random.Random(42)`
    shuffles the list of records (their order depends only on how many there are), then `--limit N`
    takes the first N."""
    order = list(range(count))
    random.Random(RELEASED_SEED).shuffle(order)
    return order


def prepared(task: MibeTask, pairs: list[tuple[object, dict]], extractor: str) -> list[dict]:
    """Each checked record plus what the task YAMLs and the scoring read: `prompt` (the query; a chat
    template, if any, is applied by the model, see eval/backends.py), `target` (the answer a few-shot
    example shows after its prompt), the scoring settings (process_results sees only the record),
    `mibe_index` (its position in the file) and `mibe_record` (the record as read, as JSON text: what
    the samples files keep for rescoring)."""
    out = []
    for index, (raw, record) in enumerate(pairs):
        prompt, target = record["query"], target_text(task, record)
        if not prompt[-1].isspace():
            target = " " + target  # "Answer: yes", as lm-eval's default target delimiter would
        out.append({**record, "prompt": prompt, "target": target, "mibe_task": task.name,
                    "mibe_extractor": extractor, "mibe_index": index,
                    "mibe_record": json.dumps(raw, ensure_ascii=False, default=str)})
    return out
