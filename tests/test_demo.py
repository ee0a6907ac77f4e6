"""The README's first command ends in `melama demo`; the demo runs all its stages through the
installed `melama` command and says what it did, quietly. Smaller than the default (150 documents per
domain, a 512-piece tokenizer, 30 pre-training steps and so 24 LoRA steps) to fit CI: the stages and
the code are the default's. 30 steps is about the least at which the tuned model learns an answer
format (10 or 20 were not enough for every seed tried)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from melama_mcore.eval.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--docs-per-source", "150", "--vocab-size", "512", "training.train_iters=30"]


def readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)


def test_readme_opens_with_the_demo_and_the_tests():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("&& melama demo"), demo
    assert tests.endswith("&& python -m pytest -q"), tests
    assert tests in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


def test_the_instruction_set_teaches_the_answer_formats_but_holds_no_test_record(tmp_path):
    from melama_mcore.demo.instructions import write_mibe_format_instructions
    from melama_mcore.demo.mibe import CHOICE_TASKS, DEMO_RECORDS, DEMO_TASKS, demo_records, held_out_queries

    tests = {task: demo_records()[task] for task in DEMO_TASKS}
    held_out = held_out_queries()
    assert held_out == {r["query"] for records in tests.values() for r in records}
    assert len(held_out) == len(DEMO_TASKS) * DEMO_RECORDS
    for task in CHOICE_TASKS:  # each answer in an equal share: one answer to all scores a third
        golds = [r["gold"] for r in tests[task]]
        assert sorted(golds) == sorted(list(range(3)) * (DEMO_RECORDS // 3)), (task, golds)

    def conversations(held_out) -> list[tuple[str, str]]:
        path = write_mibe_format_instructions(tmp_path / str(len(held_out)), samples=3000, held_out=held_out)
        lines = [json.loads(line)["conversations"] for line in path.read_text().splitlines()]
        return [(c[0]["value"], c[1]["value"]) for c in lines]

    # This many samples from the training stream meet test queries by chance: the exclusion is needed.
    assert {q for q, _ in conversations(set())} & held_out
    pairs = conversations(held_out)
    assert len(pairs) == 3000 and not {q for q, _ in pairs} & held_out
    # The evaluation's query shapes, answered in the released formats.
    by_shape = {task: [(q, a) for q, a in pairs if q.split("\n")[0] == tests[task][0]["query"].split("\n")[0]]
                for task in DEMO_TASKS}
    assert sum(map(len, by_shape.values())) == 3000 and all(by_shape.values())
    assert {a for _, a in by_shape["pubmedqa"]} == {"yes", "no", "maybe"}
    assert {a for _, a in by_shape["mednli"]} == {"entailment", "contradiction", "neutral"}
    assert all('<span class="' in a for _, a in by_shape["i2b2"])
    assert all(a.count(". ") == 0 and a.endswith(".") for _, a in by_shape["pubmedsum"])


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "peft", "lm_eval")),
                    reason="the demo's export and evaluation stages need the eval extra")
def test_demo_runs_every_stage(tmp_path):
    melama = shutil.which("melama", path=str(Path(sys.executable).parent)) or shutil.which("melama")
    assert melama, "the melama command is not installed (pip install -e .)"
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="default")  # a user's console: warnings would show
    result = subprocess.run([melama, "demo", "--output-dir", str(out), *QUICK], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, timeout=600, cwd=tmp_path)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert [int(n) for n in re.findall(r"^\[demo\] (\d+)/10 ", output, flags=re.M)] == list(range(1, 11))
    assert "resumed from" in output
    for noise in ("Traceback", "Warning:", "fatal:"):
        assert noise not in output, f"{noise!r} in the demo's output"

    pretraining = re.search(r"pre-training +loss ([\d.]+) \(step 1\) -> ([\d.]+) \(step 30\)", output)
    assert pretraining and float(pretraining[2]) < float(pretraining[1]), output[-2000:]
    chat = re.search(r"LoRA chat +loss ([\d.]+) -> ([\d.]+) over 24 steps", output)
    assert chat and float(chat[2]) < float(chat[1]), output[-2000:]
    assert "chat answer" in output
    assert (out / "hf" / "base" / "config.json").exists()
    adapter_config = json.loads((out / "hf" / "chat-lora" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == str((out / "hf" / "base").resolve())

    # Both models scored, under both extractors; each with the prompts it should have had.
    results = {name: json.loads((out / "eval" / name / "results.json").read_text()) for name in ("base", "chat")}
    for name, scores in results.items():
        assert sorted(k for k in scores if k != "protocol") == ["i2b2", "mednli", "pubmedqa", "pubmedsum"], name
        assert scores["protocol"]["extractor"] == "mibe-compat"
        assert {"accuracy", "accuracy@strict"} <= set(scores["pubmedqa"]), name
        assert {"rouge_1", "rouge_1@strict"} <= set(scores["pubmedsum"]), name
    assert results["base"]["protocol"]["template"]["name"] is None  # plain prompts
    assert results["chat"]["protocol"]["template"]["name"] == "me-llama"
    assert str(out / "hf" / "chat-lora") in results["chat"]["protocol"]["template"]["source"]  # read from the export
    table = output[output.index("[demo] 9/10"):output.index("[demo] 10/10")]
    assert "mibe-compat" in table and "strict" in table and "chat me-llama" in table, table
    for task in ("pubmedqa", "mednli", "i2b2", "pubmedsum"):
        assert re.search(rf"^ +{task} \w+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$", table, flags=re.M), table
    # What the demo is for: tuned on the answer formats, the chat model scores above the base on a task
    # (seen at 0.333 against 0 on PubMedQA for three seeds: it answers in the format, one answer).
    headline = {task: TASKS[task].metrics[0] for task in ("pubmedqa", "mednli", "i2b2", "pubmedsum")}
    gains = {task: results["chat"][task][m] - results["base"][task][m] for task, m in headline.items()}
    assert max(gains.values()) > 0, gains

    # The report over both runs and both evaluations, the base as the baseline.
    report_md = (out / "report" / "report.md").read_text()
    assert (out / "report" / "report.html").stat().st_size > 0
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["baseline"] == "base"
    # One group (the same protocol; each model in its own template), the change against the base.
    [group] = data["scores"]
    assert group["models"] == ["base", "chat"] and group["baseline"] == "base"
    best = max(gains, key=gains.get)
    assert group["tasks"][best]["metrics"][headline[best]]["chat"]["change"] == pytest.approx(gains[best])
    assert "base" in report_md and "chat" in report_md
    assert f"report         {out / 'report' / 'report.html'}" in output
