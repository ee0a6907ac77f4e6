"""MIBE records and the lm-eval task folder: reading JSONL/JSON/parquet, schema errors that name the
file and line but never the record's text, i2b2 and PubMed records in the released schema, the
released evaluator's record order, the task YAMLs tied to tasks.py, and the tasks run through lm-eval
itself with a scripted model whose answers are scored by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from melama_mcore.errors import DataError
from melama_mcore.demo.mibe import DEMO_TASKS, write_demo_records
from melama_mcore.eval.data import load_splits, prepared, read_records, released_order
from melama_mcore.eval.tasks import GROUP, TASK_DIR, TASKS

SECRET = "Mr. Example-Patient-4711"  # stands for patient text: must never appear in an error
PUBMEDQA = [{"query": f"Context about {SECRET}. Question?\nAnswer:", "answer": a, "choices": ["yes", "no", "maybe"],
             "gold": g} for a, g in (("yes", 0), ("no", 1), ("maybe", 2), ("yes", 0))]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# Reading and checking records
# ---------------------------------------------------------------------------------------------
def test_jsonl_json_and_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "a" / "pubmedqa.jsonl", PUBMEDQA)
    jsonl.write_text(jsonl.read_text().replace("\n", "\n\n", 1))  # a blank line is skipped
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pubmedqa.json").write_text(json.dumps(PUBMEDQA))
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(PUBMEDQA), tmp_path / "c" / "pubmedqa.parquet")
    loaded = [load_splits(TASKS["pubmedqa"], tmp_path / d) for d in "abc"]
    assert loaded[0] == loaded[1] == loaded[2]
    assert [raw for raw, _ in loaded[0]["test"]] == PUBMEDQA  # the records exactly as read
    assert [r["gold"] for _, r in loaded[0]["test"]] == [0, 1, 2, 0] and loaded[0]["train"] == []
    assert [where for where, _ in read_records(jsonl)][:2] == [f"{jsonl}:1", f"{jsonl}:3"]


def test_training_examples_are_the_fewshot_split(tmp_path):
    write_jsonl(tmp_path / "pubmedqa.jsonl", PUBMEDQA)
    write_jsonl(tmp_path / "pubmedqa_train.jsonl", PUBMEDQA[:2])
    assert len(load_splits(TASKS["pubmedqa"], tmp_path)["train"]) == 2


def error_of(task: str, data_dir: Path) -> str:
    with pytest.raises(DataError) as info:
        load_splits(TASKS[task], data_dir)
    message = str(info.value)
    assert SECRET not in message and "\n" not in message
    return message


def test_missing_and_malformed_files_name_the_file_and_line(tmp_path):
    assert error_of("pubmedqa", tmp_path) == (f"{tmp_path / 'pubmedqa.jsonl'} not found (also looked for .json and "
                                              ".parquet): the PubMedQA test records")
    lines = [json.dumps(r) for r in PUBMEDQA[:2]] + ['{"query": "' + SECRET + '", "answer"']
    (tmp_path / "pubmedqa.jsonl").write_text("\n".join(lines) + "\n")
    assert error_of("pubmedqa", tmp_path) == f"{tmp_path / 'pubmedqa.jsonl'}:3: not valid JSON"
    # not UTF-8: the line that holds the bad byte, in JSON Lines and in a JSON list
    (tmp_path / "pubmedqa.jsonl").write_bytes("\n".join(lines[:2]).encode() + b'\n{"query": "caf\xe9"}\n')
    assert error_of("pubmedqa", tmp_path) == f"{tmp_path / 'pubmedqa.jsonl'}:3: not UTF-8 text"
    (tmp_path / "pubmedqa.jsonl").unlink()
    (tmp_path / "pubmedqa.json").write_bytes(b'[\n{"query": "a"},\n{"query": "caf\xe9"}\n]')
    assert error_of("pubmedqa", tmp_path) == f"{tmp_path / 'pubmedqa.json'}:3: not UTF-8 text"
    (tmp_path / "pubmedqa.json").write_text(json.dumps({"data": PUBMEDQA}))
    assert "expected a JSON list of records" in error_of("pubmedqa", tmp_path)
    (tmp_path / "pubmedqa.json").unlink()
    (tmp_path / "pubmedqa.parquet").write_bytes(b"PAR1 not really")
    assert "not a readable parquet file" in error_of("pubmedqa", tmp_path)
    # empty records: one line each, naming the file and line
    (tmp_path / "pubmedqa.parquet").unlink()
    (tmp_path / "pubmedqa.jsonl").write_text(json.dumps(PUBMEDQA[0]) + "\n{}\n")
    assert error_of("pubmedqa", tmp_path) == (f"{tmp_path / 'pubmedqa.jsonl'}:2: no field 'query' (pubmedqa records "
                                              "need query, choices, gold)")
    (tmp_path / "pubmedqa.jsonl").write_text("null\n")
    assert error_of("pubmedqa", tmp_path) == (f"{tmp_path / 'pubmedqa.jsonl'}:1: expected a JSON object with fields "
                                              "query, choices, gold")
    (tmp_path / "pubmedqa.jsonl").write_text("\n\n")
    assert error_of("pubmedqa", tmp_path) == f"{tmp_path / 'pubmedqa.jsonl'} has no records"


@pytest.mark.parametrize("task,change,message", [
    ("pubmedqa", {"choices": None}, "no field 'choices' (pubmedqa records need query, choices, gold)"),
    ("pubmedqa", {"gold": 3}, "field 'gold' must be an index into 'choices' (0..2)"),
    ("pubmedqa", {"gold": True}, "field 'gold' must be an index"),
    ("pubmedqa", {"query": ""}, "field 'query' must be a non-empty string"),
    ("hoc", {"gold": [1, 0]}, "field 'gold' must be a multi-hot list of 3 zeros and ones"),
    ("i2b2", {"label": ["O", "B-problem"]}, "field 'label' must be a list of BIO tags"),
    ("i2b2", {"label": ["O", "X-problem", "O"]}, "field 'label' must be a list of BIO tags"),
    ("i2b2", {"token": None, "label": None}, "no gold entities: i2b2 records need 'answer' (the sentence with HTML"),
    ("i2b2", {"token": None, "label": None, "answer": "<br>"}, "field 'answer' must be HTML with words in it"),
    ("pubmedsum", {"answer": " "}, "field 'answer' must be a non-empty string"),
])
def test_wrong_schema(tmp_path, task, change, message):
    record = {"pubmedqa": PUBMEDQA[1], "hoc": {**PUBMEDQA[1], "gold": [0, 1, 1]},
              "i2b2": {"query": SECRET, "token": ["chest", "pain", "."], "label": ["B-problem", "I-problem", "O"]},
              "pubmedsum": {"query": SECRET, "answer": "A summary."}}[task]
    record = {k: v for k, v in {**record, **change}.items() if v is not None}
    write_jsonl(tmp_path / f"{task}.jsonl", [PUBMEDQA[0] if task == "pubmedqa" else record, record])
    where = f"{tmp_path / (task + '.jsonl')}:{2 if task == 'pubmedqa' else 1}: "
    assert error_of(task, tmp_path).startswith(where + message)


def test_public_and_restricted_sets_without_a_data_dir(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert error_of("mednli", None) == ("mednli: MedNLI is not public (data-use agreement): pass --data-dir DIR "
                                        "with mednli.jsonl")
    message = error_of("pubmedqa", None)
    assert message.startswith("pubmedqa: cannot load clinicalnlplab/pubmedqa_test from the Hugging Face Hub")
    assert message.endswith("or pass --data-dir DIR with pubmedqa.jsonl")


def test_prepared_records():
    record = {"query": "Is it?\nAnswer:", "answer": "", "choices": ["yes", "no"], "gold": 1, "id": "x7"}
    checked = {k: v for k, v in record.items() if k != "id"}
    doc, = prepared(TASKS["pubmedqa"], [(record, checked)], extractor="mibe-compat")
    assert doc["prompt"] == "Is it?\nAnswer:" and doc["target"] == " no"  # the answer's delimiter
    assert (doc["mibe_task"], doc["mibe_extractor"], doc["mibe_index"]) == ("pubmedqa", "mibe-compat", 0)
    assert json.loads(doc["mibe_record"]) == record  # every field of the record as read, for the samples file


def test_released_i2b2_and_pubmed_records(tmp_path, monkeypatch):
    """i2b2 as released (`query`, gold HTML spans in `answer`, no token/label): the gold BIO tags come
    from the HTML. PubMed summarisation is clinicalnlplab/PubmedSumm_test, whose records (built by the
    released preprocessing's PubmedSumm class) are `id`, `query` (its prompt around the paper's text)
    and `answer` (the reference summary)."""
    i2b2 = {"id": "i2b20", "query": f"Mark the entities. INPUT: {SECRET} denies chest pain . OUTPUT:",
            "answer": f'{SECRET} denies <span class="problem">chest pain</span> .'}
    write_jsonl(tmp_path / "i2b2.jsonl", [i2b2])
    (raw, record), = load_splits(TASKS["i2b2"], tmp_path)["test"]
    assert raw == i2b2
    assert record["token"] == ["Mr", ".", "Example", "-", "Patient", "-", "4711", "denies", "chest", "pain", "."]
    assert record["label"] == ["O"] * 8 + ["B-problem", "I-problem", "O"] and record["answer"] == i2b2["answer"]

    import datasets

    pubmed = {"id": "PubmedSumm0", "query": "***TASK***\nthe task is to summarize an input biomedical literature in "
              "six sentences\n\nInput: Aspirin was given to 40 adults.\nOutput:\n",
              "answer": "Aspirin was studied in adults."}
    asked = []

    def load_dataset(name):
        asked.append(name)
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([pubmed])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    splits = load_splits(TASKS["pubmedsum"], None)
    assert asked == ["clinicalnlplab/PubmedSumm_test"]
    doc, = prepared(TASKS["pubmedsum"], splits["test"], "mibe-compat")
    assert doc["prompt"] == pubmed["query"] and doc["answer"] == pubmed["answer"] and doc["target"] == pubmed["answer"]
    assert json.loads(doc["mibe_record"]) == pubmed


def fisher_yates(items: list, seed: int) -> list:
    """Python's random.shuffle written out from its documented algorithm (CPython's Random.shuffle and
    _randbelow_with_getrandbits): for i from the end, swap with j = a uniform draw below i + 1, drawn by
    rejection from getrandbits(bit length of i + 1)."""
    import random

    rng, items = random.Random(seed), list(items)
    for i in reversed(range(1, len(items))):
        bits = (i + 1).bit_length()
        j = rng.getrandbits(bits)
        while j > i:
            j = rng.getrandbits(bits)
        items[i], items[j] = items[j], items[i]
    return items


def test_released_order_is_the_released_evaluators_shuffle(tmp_path):
    for n in (1, 2, 10, 1000):
        assert released_order(n) == fisher_yates(list(range(n)), 42)
    assert released_order(10) == [7, 3, 2, 8, 5, 6, 9, 4, 0, 1]  # seed 42 on ten records (pinned: Python's stream)
    # the test split, as lm-eval's --limit sees it: file order for strict, the shuffle for mibe-compat
    from melama_mcore.eval.harness import dataset

    records = [{**PUBMEDQA[i % 4], "query": f"Question {i}?"} for i in range(10)]
    write_jsonl(tmp_path / "pubmedqa.jsonl", records)
    compat = dataset("pubmedqa", str(tmp_path), extractor="mibe-compat")["test"]
    assert [d["mibe_index"] for d in compat] == fisher_yates(list(range(10)), 42)
    assert [d["query"] for d in compat] == [records[i]["query"] for i in fisher_yates(list(range(10)), 42)]
    strict = dataset("pubmedqa", str(tmp_path), extractor="strict")["test"]
    assert [d["mibe_index"] for d in strict] == list(range(10))


# ---------------------------------------------------------------------------------------------
# Through lm-eval: the task folder, the group, few-shot contexts, scoring
# ---------------------------------------------------------------------------------------------
def scripted_model(answers: dict[str, str], seen: list):
    """An lm-eval model that answers each prompt from a script (keyed by a substring of the prompt)."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            seen.extend(r.args for r in requests)
            return [next(a for key, a in answers.items() if key in r.args[0]) for r in requests]

    return Scripted()


def run_lm_eval(data_dir: Path, tasks: list[str], answers: dict[str, str], num_fewshot=None, limit=None,
                **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    seen = []
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir), **metadata})
    out = lm_eval.simple_evaluate(model=scripted_model(answers, seen), tasks=tasks, task_manager=manager,
                                  bootstrap_iters=0, num_fewshot=num_fewshot, limit=limit, log_samples=True)
    return out, seen


def test_task_folder_indexes_twelve_tasks_and_the_group():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(manager.all_subtasks) == set(TASKS) and manager.all_groups == [GROUP]


def test_task_yamls_follow_tasks_py():
    """Every fact the YAMLs repeat for lm-eval is the one tasks.py holds: each task's kind (the file it
    includes) and mibe_task, each kind's metrics in order with their aggregation, the generation budget,
    the group's tasks in the paper's order."""
    import yaml

    from melama_mcore.eval import harness
    from melama_mcore.eval.tasks import GENERATION_BUDGET, KINDS

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))

    def read(name: str) -> dict:
        return yaml.load((TASK_DIR / name).read_text(), Loader=Loader)

    common = read("_mibe_common_yaml")
    assert common["generation_kwargs"]["max_gen_toks"] == GENERATION_BUDGET
    assert common["process_results"] == ("function", "melama_mcore.eval.harness.process_results")
    for kind in KINDS:
        spec = read(kind.yaml)
        assert spec["include"] == "_mibe_common_yaml"
        assert [m["metric"] for m in spec["metric_list"]] == list(kind.metrics)
        for m in spec["metric_list"]:
            assert m["aggregation"] == ("function", f"melama_mcore.eval.harness.agg_{m['metric']}")
            assert callable(getattr(harness, f"agg_{m['metric']}"))
            assert m["higher_is_better"] == (m["metric"] != "missing_rate")
    for task in TASKS.values():
        spec = read(f"{task.name}.yaml")
        assert (spec["task"], spec["include"], spec["dataset_kwargs"]) == (task.name, task.kind.yaml,
                                                                           {"mibe_task": task.name})
    assert read("_mibe.yaml")["task"] == list(TASKS)
    assert sorted(p.name for p in TASK_DIR.iterdir()) == sorted(
        ["_mibe.yaml", "_mibe_common_yaml", *(k.yaml for k in KINDS), *(f"{t}.yaml" for t in TASKS)])


def test_scores_through_lm_eval(tmp_path):
    from melama_mcore.eval.scoring import Generated, task_result

    write_demo_records(tmp_path, records_per_task=4)
    records = {t: [json.loads(line) for line in (tmp_path / f"{t}.jsonl").read_text().splitlines()] for t in DEMO_TASKS}
    qa, nli, ner, summ = (records[t] for t in DEMO_TASKS)
    answers = {  # keyed by a piece of each prompt that is unique to its record
        qa[0]["query"]: qa[0]["choices"][qa[0]["gold"]],           # right
        qa[1]["query"]: "I cannot tell.",                          # missing (strict)
        qa[2]["query"]: qa[2]["choices"][(qa[2]["gold"] + 1) % 3],  # wrong
        qa[3]["query"]: qa[3]["choices"][qa[3]["gold"]] + ".",     # right
        **{r["query"]: r["choices"][r["gold"]] for r in nli},      # all right
        **{r["query"]: r["answer"] for r in ner},                  # the gold spans exactly
        **{r["query"]: r["answer"] for r in summ},                 # the reference summary
    }
    out, seen = run_lm_eval(tmp_path, list(DEMO_TASKS), answers, extractor="strict")
    results = out["results"]
    assert sorted(args[0] for args in seen) == sorted(r["query"] for t in DEMO_TASKS for r in records[t])  # plain
    assert seen[0][1] == {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    assert results["pubmedqa"]["accuracy,none"] == pytest.approx(2 / 4)
    assert results["pubmedqa"]["missing_rate,none"] == pytest.approx(1 / 4)
    from melama_mcore.eval.metrics import macro_f1

    preds = [qa[0]["gold"], None, (qa[2]["gold"] + 1) % 3, qa[3]["gold"]]
    assert results["pubmedqa"]["macro_f1,none"] == pytest.approx(macro_f1(preds, [r["gold"] for r in qa]))
    assert results["mednli"]["accuracy,none"] == results["mednli"]["macro_f1,none"] == 1.0
    assert results["i2b2"]["entity_f1,none"] == 1.0
    assert results["pubmedsum"]["rouge_l,none"] == pytest.approx(1.0)
    # lm-eval's numbers are scoring's, exactly (the one scoring function)
    for task in DEMO_TASKS:
        row = task_result(TASKS[task], [Generated(s["doc"], s["resps"][0][0]) for s in out["samples"][task]],
                          "strict").row
        for metric in TASKS[task].metrics:
            value = results[task][f"{metric},none"]
            assert (row[metric] is None and value != value) or row[metric] == value, (task, metric)


def test_limit_takes_the_released_records(tmp_path):
    """--limit under mibe-compat: the records the released evaluator took (its seed-42 shuffle)."""
    records = [{**PUBMEDQA[i % 4], "query": f"Question {i}?"} for i in range(10)]
    write_jsonl(tmp_path / "pubmedqa.jsonl", records)
    _, seen = run_lm_eval(tmp_path, ["pubmedqa"], {"Question": "yes"}, limit=3, extractor="mibe-compat")
    assert sorted(args[0] for args in seen) == sorted(records[i]["query"] for i in fisher_yates(list(range(10)), 42)[:3])
    _, seen = run_lm_eval(tmp_path, ["pubmedqa"], {"Question": "yes"}, limit=3, extractor="strict")
    assert sorted(args[0] for args in seen) == sorted(r["query"] for r in records[:3])


def test_fewshot_context(tmp_path):
    example = {"query": "Does A help?\nANSWER:", "answer": "yes", "choices": ["yes", "no", "maybe"], "gold": 0}
    test = {"query": "Does B help?\nANSWER:", "answer": "no", "choices": ["yes", "no", "maybe"], "gold": 1}
    write_jsonl(tmp_path / "pubmedqa.jsonl", [test])
    write_jsonl(tmp_path / "pubmedqa_train.jsonl", [example])
    _, seen = run_lm_eval(tmp_path, ["pubmedqa"], {"B help": "no"}, num_fewshot=1)
    # a chat template (the model's, see test_eval_prompts) wraps this whole context as one user turn
    assert seen[0][0] == "Does A help?\nANSWER: yes\n\nDoes B help?\nANSWER:"


def test_the_mibe_group_from_local_files(tmp_path):
    from melama_mcore.eval.command import leaf_tasks, load_tasks
    from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER

    one = {CHOICE.name: PUBMEDQA[0], MULTILABEL.name: {**PUBMEDQA[0], "gold": [1, 0, 1]},
           EXTRACTIVE_QA.name: {"query": "Where?", "answer": "left lower lobe"},
           NER.name: {"query": "Tag it.", "answer": '<span class="problem">chest pain</span>'}}
    for task in TASKS.values():
        write_jsonl(tmp_path / f"{task.name}.jsonl",
                    [one.get(task.kind.name, {"query": "Sum up.", "answer": "A summary."})])
    _, objects = load_tasks(["pubmedqa", GROUP], {"data_dir": str(tmp_path)})  # pubmedqa is in the group
    assert list(objects) == [GROUP]
    assert sorted(leaf_tasks(objects)) == sorted(TASKS)
