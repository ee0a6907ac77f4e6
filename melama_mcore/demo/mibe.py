"""The evaluation step of `melama demo`: small synthetic MIBE-shaped records and the results table.

Records are invented from the demo corpus's word lists (no real patients or papers): PubMedQA-style
yes/no/maybe questions, MedNLI-style premise/hypothesis pairs, i2b2-style entity tagging and
PubMed-style summaries, in the released schema. Scores of the demo's tiny model are meaningless;
the point is the pipeline (checkpoint -> HF export -> lm-eval generation -> extraction -> metrics).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from melama_mcore.demo.corpus import DISEASES, DRUGS, OUTCOMES, SYMPTOMS
from melama_mcore.eval.command import EvalOptions, evaluate
from melama_mcore.eval.extraction import WORD, spans_to_html

DEMO_TASKS = ("pubmedqa", "mednli", "i2b2", "pubmedsum")
DEMO_NEW_TOKENS = 32  # the tiny preset's context is 256 tokens: no room for the paper's 256 new ones
_TESTS = ["chest x-ray", "complete blood count", "troponin level", "ECG", "CT scan", "urine culture",
          "echocardiogram", "lipid panel"]
_EFFECTS = {"yes": "reduced", "no": "did not change", "maybe": "may have reduced"}


def _pubmedqa(rng: random.Random) -> dict:
    disease, drug, outcome = rng.choice(DISEASES), rng.choice(DRUGS), rng.choice(OUTCOMES)
    gold = rng.randrange(3)
    choices = ["yes", "no", "maybe"]
    context = (f"In a cohort of {rng.randint(40, 900)} adults with {disease}, {drug} "
               f"{_EFFECTS[choices[gold]]} {outcome} over {rng.randint(6, 36)} months.")
    query = ("Answer the question about the abstract with yes, no or maybe.\n"
             f"CONTEXT: {context}\nQUESTION: Does {drug} reduce {outcome} in {disease}?\nANSWER:")
    return {"query": query, "answer": choices[gold], "choices": choices, "gold": gold}


def _mednli(rng: random.Random) -> dict:
    symptom, disease = rng.choice(SYMPTOMS), rng.choice(DISEASES)
    premise = f"A {rng.randint(19, 94)}-year-old {rng.choice(['man', 'woman'])} presented with {symptom}."
    choices = ["entailment", "contradiction", "neutral"]
    gold = rng.randrange(3)
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


_MAKERS = {"pubmedqa": _pubmedqa, "mednli": _mednli, "i2b2": _i2b2, "pubmedsum": _pubmedsum}


def write_demo_records(data_dir: Path, records_per_task: int = 8, seed: int = 0) -> tuple[str, ...]:
    """Write <task>.jsonl test records (and a few <task>_train.jsonl examples for --num-fewshot) of
    DEMO_TASKS into data_dir; returns the task names. Deterministic for a seed."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for index, (name, make) in enumerate(_MAKERS.items()):
        rng = random.Random(f"{seed}:{index}")
        for stem, count in ((name, records_per_task), (f"{name}_train", 3)):
            path = data_dir / f"{stem}.jsonl"
            tmp = path.with_name(path.name + ".incomplete")
            tmp.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(count)), encoding="utf-8")
            tmp.replace(path)
    return DEMO_TASKS


def print_results_table(out_dir: Path) -> None:
    """Print the results.md a `melama eval` run wrote into out_dir."""
    print((Path(out_dir) / "results.md").read_text(encoding="utf-8"), end="")


def run_demo_evaluation(model: Path, out: Path, adapter: Path | None = None) -> Path:
    """The demo's step: records into out/mibe_data, `melama eval` of `model` (the demo's run folder,
    or an HF folder with a PEFT `adapter`: then in the Me-LLaMA chat format) into out/eval with the
    demo's short generations; prints the table. Returns the results folder."""
    out = Path(out)
    write_demo_records(out / "mibe_data")
    evaluate(EvalOptions(model=Path(model), tasks=list(DEMO_TASKS), out=out / "eval", data_dir=out / "mibe_data",
                         adapter=adapter, chat=adapter is not None, log_samples=True,
                         max_new_tokens=DEMO_NEW_TOKENS))
    print_results_table(out / "eval")
    return out / "eval"
