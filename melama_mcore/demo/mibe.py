"""The evaluation step of `melama demo`: small synthetic MIBE-shaped records, the base and the chat
model scored on them, and a short comparison table.

Records are invented from the demo corpus's word lists (no real patients or papers): PubMedQA-style
yes/no/maybe questions, MedNLI-style premise/hypothesis pairs, i2b2-style entity tagging and
PubMed-style summaries, in the released schema. The demo's instruction set holds records of the same
makers from another random stream (instructions.write_mibe_format_instructions, test records left
out), so the tuned model learns the answer formats it is scored on; the tiny model's scores show that
it learnt them, not medicine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from melama_mcore.demo.corpus import DISEASES, DRUGS, OUTCOMES, SYMPTOMS, write_jsonl
from melama_mcore.eval.command import EvalOptions, evaluate
from melama_mcore.eval.extraction import EXTRACTORS, WORD, spans_to_html
from melama_mcore.eval.tasks import TASKS

DEMO_TASKS = ("pubmedqa", "mednli", "i2b2", "pubmedsum")
DEMO_RECORDS = 12  # test records per task; the choice tasks' answers in equal shares
DEMO_NEW_TOKENS = 32  # the tiny preset's context is 256 tokens: no room for the paper's 256 new ones
_TESTS = ["chest x-ray", "complete blood count", "troponin level", "ECG", "CT scan", "urine culture",
          "echocardiogram", "lipid panel"]
_EFFECTS = {"yes": "reduced", "no": "did not change", "maybe": "may have reduced"}


def _pubmedqa(rng: random.Random, gold: int | None = None) -> dict:
    disease, drug, outcome = rng.choice(DISEASES), rng.choice(DRUGS), rng.choice(OUTCOMES)
    gold = rng.randrange(3) if gold is None else gold
    choices = ["yes", "no", "maybe"]
    context = (f"In a cohort of {rng.randint(40, 900)} adults with {disease}, {drug} "
               f"{_EFFECTS[choices[gold]]} {outcome} over {rng.randint(6, 36)} months.")
    query = ("Answer the question about the abstract with yes, no or maybe.\n"
             f"CONTEXT: {context}\nQUESTION: Does {drug} reduce {outcome} in {disease}?\nANSWER:")
    return {"query": query, "answer": choices[gold], "choices": choices, "gold": gold}


def _mednli(rng: random.Random, gold: int | None = None) -> dict:
    symptom, disease = rng.choice(SYMPTOMS), rng.choice(DISEASES)
    premise = f"A {rng.randint(19, 94)}-year-old {rng.choice(['man', 'woman'])} presented with {symptom}."
    choices = ["entailment", "contradiction", "neutral"]
    gold = rng.randrange(3) if gold is None else gold
    hypothesis = [f"The patient has {symptom}.", f"The patient denies {symptom}.",
                  f"The patient has a history of {disease}."][gold]
    query = ("Decide whether the hypothesis follows from the premise: entailment, contradiction or neutral.\n"
             f"PREMISE: {premise}\nHYPOTHESIS: {hypothesis}\nANSWER:")
    return {"query": query, "answer": choices[gold], "choices": choices, "gold": gold}


def _i2b2(rng: random.Random) -> dict:
    parts = [("The patient reported", None), (rng.choice(SYMPTOMS), "problem"), ("and a", None),
             (rng.choice(_TESTS), "test"), ("was ordered before starting", None), (rng.choice(DRUGS), "treatment"),
             (".", None)]
    tokens, labels = [], []
    for text, kind in parts:
        words = WORD.findall(text)
        tokens += words
        labels += ["O"] * len(words) if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    query = ('Mark every problem, treatment and test in the sentence with HTML spans, e.g. '
             '<span class="problem">fever</span>.\n'
             f"SENTENCE: {' '.join(tokens)}\nOUTPUT:")
    return {"query": query, "answer": spans_to_html(tokens, labels), "token": tokens, "label": labels}


def _pubmedsum(rng: random.Random) -> dict:
    disease, drug, outcome = rng.choice(DISEASES), rng.choice(DRUGS), rng.choice(OUTCOMES)
    effect = rng.choice(list(_EFFECTS.values()))
    abstract = (f"We followed {rng.randint(40, 900)} adults with {disease} for {rng.randint(6, 36)} months. "
                f"Patients receiving {drug} were compared with usual care. {drug.capitalize()} {effect} "
                f"{outcome}, and adverse events were rare.")
    return {"query": f"Summarize the abstract in one sentence.\nABSTRACT: {abstract}\nSUMMARY:",
            "answer": f"{drug.capitalize()} {effect} {outcome} in adults with {disease}."}


RECORD_MAKERS = {"pubmedqa": _pubmedqa, "mednli": _mednli, "i2b2": _i2b2, "pubmedsum": _pubmedsum}
CHOICE_TASKS = ("pubmedqa", "mednli")  # their makers take the answer (`gold`) to write


def demo_records(records_per_task: int = DEMO_RECORDS, seed: int = 0) -> dict[str, list[dict]]:
    """{file stem: records}: <task> (test records) and <task>_train (3 examples for --num-fewshot) of
    DEMO_TASKS. The test records of a choice task take its answers in turn, so that a model which has
    learnt only the answer format (one answer to every question) scores a third, not zero or one by
    the luck of a draw. Deterministic for a seed."""
    records = {}
    for index, (name, make) in enumerate(RECORD_MAKERS.items()):
        rng = random.Random(f"{seed}:{index}")
        if name in CHOICE_TASKS:
            records[name] = [make(rng, gold=i % 3) for i in range(records_per_task)]
        else:
            records[name] = [make(rng) for _ in range(records_per_task)]
        records[f"{name}_train"] = [make(rng) for _ in range(3)]
    return records


def write_demo_records(data_dir: Path, records_per_task: int = DEMO_RECORDS, seed: int = 0) -> tuple[str, ...]:
    """Write demo_records() as <stem>.jsonl files into data_dir; returns the task names."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, records in demo_records(records_per_task, seed).items():
        write_jsonl(data_dir / f"{stem}.jsonl", records)
    return DEMO_TASKS


def held_out_queries(records_per_task: int = DEMO_RECORDS) -> set[str]:
    """The queries of the demo's test records: what its instruction set must not hold."""
    return {r["query"] for stem, records in demo_records(records_per_task).items() if stem in DEMO_TASKS
            for r in records}


def _template(results: dict) -> str:
    template = results["protocol"]["template"] or {}
    return template.get("name") or "plain prompts"


def comparison_table(base: dict, chat: dict) -> str:
    """Per task, the headline metric of the base and the chat model under the chosen extractor and
    under the other one (results.json's `<metric>@<other>`), and the template each was prompted with."""
    chosen = chat["protocol"]["extractor"]
    other = next(e for e in EXTRACTORS if e != chosen)
    width = max(len(f"{t} {TASKS[t].metrics[0]}") for t in DEMO_TASKS)
    lines = [f"    {'':{width}}  {chosen:>15}  {other:>15}",
             f"    {'task, metric':{width}}  {'base':>7} {'chat':>7}  {'base':>7} {'chat':>7}"]
    for task in DEMO_TASKS:
        metric = TASKS[task].metrics[0]
        values = [row[task].get(m) for m in (metric, f"{metric}@{other}") for row in (base, chat)]
        cells = [f"{v:7.3f}" if v is not None else f"{'n/a':>7}" for v in values]
        lines.append(f"    {f'{task} {metric}':{width}}  {cells[0]} {cells[1]}  {cells[2]} {cells[3]}")
    lines.append(f"    prompts: base {_template(base)}, chat {_template(chat)} "
                 f"({chat['protocol']['template'] and chat['protocol']['template'].get('source')})")
    return "\n".join(lines)


def run_demo_evaluation(base: Path, adapter: Path, out: Path) -> dict[str, Path]:
    """The demo's step: records into out/mibe_data; `melama eval` of the exported base with plain
    prompts into out/eval/base, and of the base with the PEFT `adapter` into out/eval/chat, prompted
    with the template the adapter's export carries; short generations. Prints the comparison and
    returns the two results folders."""
    out = Path(out)
    write_demo_records(out / "mibe_data")
    folders = {"base": out / "eval" / "base", "chat": out / "eval" / "chat"}
    for name, folder in folders.items():
        evaluate(EvalOptions(model=Path(base), tasks=list(DEMO_TASKS), out=folder, data_dir=out / "mibe_data",
                             adapter=adapter if name == "chat" else None, chat=False if name == "base" else None,
                             log_samples=True, max_new_tokens=DEMO_NEW_TOKENS))
    results = {name: json.loads((folder / "results.json").read_text(encoding="utf-8"))
               for name, folder in folders.items()}
    print(comparison_table(results["base"], results["chat"]), flush=True)
    return folders
