"""MIBE records and the lm-eval task folder: reading JSONL/JSON/parquet, schema errors that name the
file and line but never the record's text, prompts in the chat and plain formats, and the tasks run
through lm-eval itself with a scripted model whose answers are scored by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from melama_mcore.errors import DataError
from melama_mcore.eval.data import load_splits, read_records, with_prompts
from melama_mcore.demo.mibe import DEMO_TASKS, write_demo_records
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
    assert [r["gold"] for r in loaded[0]["test"]] == [0, 1, 2, 0] and loaded[0]["train"] == []
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
    (tmp_path / "pubmedqa.jsonl").unlink()
    (tmp_path / "pubmedqa.json").write_text(json.dumps({"data": PUBMEDQA}))
    assert "expected a JSON list of records" in error_of("pubmedqa", tmp_path)
    (tmp_path / "pubmedqa.json").unlink()
    (tmp_path / "pubmedqa.parquet").write_bytes(b"PAR1 not really")
    assert "not a readable parquet file" in error_of("pubmedqa", tmp_path)


@pytest.mark.parametrize("task,change,message", [
    ("pubmedqa", {"choices": None}, "no field 'choices' (pubmedqa records need query, choices, gold)"),
    ("pubmedqa", {"gold": 3}, "field 'gold' must be an index into 'choices' (0..2)"),
    ("pubmedqa", {"gold": True}, "field 'gold' must be an index"),
    ("pubmedqa", {"query": ""}, "field 'query' must be a non-empty string"),
    ("hoc", {"gold": [1, 0]}, "field 'gold' must be a multi-hot list of 3 zeros and ones"),
    ("i2b2", {"label": ["O", "B-problem"]}, "field 'label' must be a list of BIO tags"),
    ("i2b2", {"label": ["O", "X-problem", "O"]}, "field 'label' must be a list of BIO tags"),
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


def test_prompts_in_chat_and_plain_format():
    record = {"query": "Is it?\nAnswer:", "answer": "", "choices": ["yes", "no"], "gold": 1}
    chat, = with_prompts(TASKS["pubmedqa"], [record], chat=True, extractor="strict")
    assert chat["prompt"] == "Human: \nIs it?\nAnswer:\n\nAssistant: \n" and chat["target"] == "no"
    plain, = with_prompts(TASKS["pubmedqa"], [record], chat=False, extractor="mibe-compat")
    assert plain["prompt"] == "Is it?\nAnswer:" and plain["target"] == " no"  # the answer's delimiter
    assert (plain["mibe_task"], plain["mibe_extractor"]) == ("pubmedqa", "mibe-compat")


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


def run_lm_eval(data_dir: Path, tasks: list[str], answers: dict[str, str], **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    seen = []
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir), **metadata})
    out = lm_eval.simple_evaluate(model=scripted_model(answers, seen), tasks=tasks, task_manager=manager,
                                  bootstrap_iters=0, num_fewshot=metadata.pop("num_fewshot", None))
    return out["results"], seen


def test_task_folder_indexes_twelve_tasks_and_the_group():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(manager.all_subtasks) == set(TASKS) and manager.all_groups == [GROUP]


def test_scores_through_lm_eval(tmp_path):
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
    results, seen = run_lm_eval(tmp_path, list(DEMO_TASKS), answers, chat=True)
    assert all(args[0].startswith("Human: \n") and args[0].endswith("\n\nAssistant: \n") for args in seen)
    assert seen[0][1] == {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    assert results["pubmedqa"]["accuracy,none"] == pytest.approx(2 / 4)
    assert results["pubmedqa"]["missing_rate,none"] == pytest.approx(1 / 4)
    from melama_mcore.eval.metrics import macro_f1

    preds = [qa[0]["gold"], None, (qa[2]["gold"] + 1) % 3, qa[3]["gold"]]
    assert results["pubmedqa"]["macro_f1,none"] == pytest.approx(macro_f1(preds, [r["gold"] for r in qa]))
    assert results["mednli"]["accuracy,none"] == results["mednli"]["macro_f1,none"] == 1.0
    assert results["i2b2"]["entity_f1,none"] == 1.0
    assert results["pubmedsum"]["rouge_l,none"] == pytest.approx(1.0)


@pytest.mark.parametrize("chat", [True, False])
def test_fewshot_context(tmp_path, chat):
    example = {"query": "Does A help?\nANSWER:", "answer": "yes", "choices": ["yes", "no", "maybe"], "gold": 0}
    test = {"query": "Does B help?\nANSWER:", "answer": "no", "choices": ["yes", "no", "maybe"], "gold": 1}
    write_jsonl(tmp_path / "pubmedqa.jsonl", [test])
    write_jsonl(tmp_path / "pubmedqa_train.jsonl", [example])
    _, seen = run_lm_eval(tmp_path, ["pubmedqa"], {"B help": "no"}, chat=chat, num_fewshot=1)
    if chat:  # earlier examples become earlier turns of the conversation
        assert seen[0][0] == ("Human: \nDoes A help?\nANSWER:\n\nAssistant: \nyes\n\n"
                              "Human: \nDoes B help?\nANSWER:\n\nAssistant: \n")
    else:
        assert seen[0][0] == "Does A help?\nANSWER: yes\n\nDoes B help?\nANSWER:"


def test_the_mibe_group_from_local_files(tmp_path):
    from melama_mcore.eval.command import leaf_tasks, load_tasks
    from melama_mcore.eval.tasks import CHOICE, EXTRACTIVE_QA, MULTILABEL, NER

    one = {CHOICE: PUBMEDQA[0], MULTILABEL: {**PUBMEDQA[0], "gold": [1, 0, 1]},
           EXTRACTIVE_QA: {"query": "Where?", "answer": "left lower lobe"},
           NER: {"query": "Tag it.", "token": ["chest", "pain"], "label": ["B-problem", "I-problem"]}}
    for task in TASKS.values():
        write_jsonl(tmp_path / f"{task.name}.jsonl", [one.get(task.kind, {"query": "Sum up.", "answer": "A summary."})])
    _, objects = load_tasks(["pubmedqa", GROUP], {"data_dir": str(tmp_path)})  # pubmedqa is in the group
    assert list(objects) == [GROUP]
    assert sorted(leaf_tasks(objects)) == sorted(TASKS)
