"""A small synthetic medical instruction set, in the three input formats, for the demo, tests and
benchmarks. Everything is invented from templates and word lists (those of the synthetic pre-training
corpus): no real patients, questions or papers, nothing downloaded. The same seed gives the same files.

Like Me-LLaMA's mix, lengths run from flash-card answers of a few words to summaries of long notes:
- medical_qa.jsonl      Alpaca: flash-card and drug questions, one-line answers;
- exam_mcq.jsonl        messages, with a system prompt: multiple-choice questions, a letter and a reason;
- patient_chat.jsonl    ShareGPT (human/gpt): patient questions and doctor answers, 1-3 turns;
- clinical_tasks.jsonl  Me-LLaMA (human/agent, `TASK: ...###INPUT: ...OUTPUT:` prompts): summaries of
                        abstracts and notes, and long discharge-letter answers.
write_mibe_format_instructions adds mibe_format.jsonl (ShareGPT): questions shaped like the demo's
MIBE records, answered in the released answer formats, so the demo's tuned model learns what it is
scored on.
"""

from __future__ import annotations

import random
from pathlib import Path

from melama_mcore.demo.corpus import (DISEASES, DRUGS, FINDINGS, OUTCOMES, SYMPTOMS, biomedical_abstract,
                                      clinical_note, write_jsonl)
from melama_mcore.demo.mibe import RECORD_MAKERS

_CLASSES = {"metformin": "a biguanide", "empagliflozin": "an SGLT2 inhibitor", "lisinopril": "an ACE inhibitor",
            "apixaban": "a factor Xa inhibitor", "atorvastatin": "a statin", "prednisone": "a corticosteroid",
            "vancomycin": "a glycopeptide antibiotic", "piperacillin-tazobactam": "a penicillin with a beta-lactamase "
            "inhibitor", "salbutamol": "a short-acting beta-2 agonist", "adalimumab": "a TNF-alpha inhibitor",
            "sertraline": "an SSRI", "furosemide": "a loop diuretic", "insulin glargine": "a long-acting insulin",
            "amoxicillin": "an aminopenicillin", "levothyroxine": "a thyroid hormone",
            "tiotropium": "a long-acting muscarinic antagonist"}
_ADVICE = ["keep a diary of your symptoms", "drink enough fluids", "avoid heavy exercise for a few days",
           "take the medicine with food", "check your blood pressure at home", "return if you feel worse",
           "book a follow-up visit in two weeks", "ask your pharmacist about interactions"]


def _medical_qa(rng: random.Random) -> dict:
    drug, disease = rng.choice(sorted(_CLASSES)), rng.choice(DISEASES)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": f"What class of drug is {drug}?", "input": "", "output": f"{drug.capitalize()} is "
                f"{_CLASSES[drug]}."}
    if kind == 1:
        return {"instruction": "Answer the question about the condition.", "input": f"Name a common symptom of "
                f"{disease}.", "output": f"{rng.choice(SYMPTOMS).capitalize()}."}
    return {"instruction": f"Is {drug} used to treat {disease}? Answer yes or no, then explain in one sentence.",
            "output": f"{rng.choice(['Yes', 'No'])}. It is {_CLASSES[drug]}, and its use in {disease} depends on "
                      f"the {rng.choice(OUTCOMES)} seen in trials."}


def _exam_mcq(rng: random.Random) -> dict:
    disease = rng.choice(DISEASES)
    options = rng.sample(sorted(_CLASSES), 4)
    answer = rng.randrange(4)
    letters = "ABCD"
    question = (f"A {rng.randint(20, 85)}-year-old patient with {disease} presents with {rng.choice(SYMPTOMS)} and "
                f"{rng.choice(FINDINGS)}. Which drug is {_CLASSES[options[answer]]}?\n" +
                "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options)))
    return {"messages": [
        {"role": "system", "content": "You are a medical exam tutor. Answer with the letter, then one reason."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"{letters[answer]}. {options[answer].capitalize()} is "
                                         f"{_CLASSES[options[answer]]}."}]}


def _patient_turn(rng: random.Random) -> tuple[str, str]:
    age, symptom, disease, drug = rng.randint(18, 80), rng.choice(SYMPTOMS), rng.choice(DISEASES), rng.choice(DRUGS)
    question = (f"Hi doctor, I am {age} years old and I have had {symptom} for {rng.randint(2, 20)} days. "
                f"I was told years ago that I have {disease}. Should I be worried?")
    answer = " ".join([f"Thanks for your question. {symptom.capitalize()} in someone with {disease} has several "
                       "possible causes, most of them treatable.",
                       f"Please see your doctor for an examination; they may check for {rng.choice(FINDINGS)}.",
                       f"If you already take {drug}, do not stop it on your own.",
                       f"Meanwhile, {rng.choice(_ADVICE)} and {rng.choice(_ADVICE)}."][: rng.randint(2, 4)])
    return question, answer


def _patient_chat(rng: random.Random) -> dict:
    turns = [_patient_turn(rng)]
    for _ in range(rng.choice([0, 0, 1, 2])):
        turns.append((f"Thank you. What about {rng.choice(DRUGS)}, is it safe for me?",
                      f"It can be, but it depends on your kidney function and other medicines; "
                      f"{rng.choice(_ADVICE)}."))
    return {"id": f"chat-{rng.randrange(10**8)}",
            "conversations": [m for q, a in turns
                              for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}


def _clinical_task(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        text = biomedical_abstract(rng)
        prompt = f"TASK: Summarise the abstract in one sentence.\n###\nINPUT: {text}\nOUTPUT:"
        answer = text.split("Conclusions: ")[-1] if "Conclusions: " in text else text.split(". ")[0] + "."
    elif kind == 1:
        text = clinical_note(rng)
        prompt = f"TASK: Write the impression for this clinical note.\n###\nINPUT: {text}\nOUTPUT:"
        answer = " ".join(line.split(": ", 1)[-1] for line in text.splitlines()[:3])
    else:
        notes = [clinical_note(rng) for _ in range(rng.randint(1, 3))]
        prompt = ("TASK: Write a discharge letter to the family doctor from these notes.\n###\nINPUT: " +
                  "\n\n".join(notes) + "\nOUTPUT:")
        answer = "Dear colleague,\n\n" + "\n\n".join(
            f"Day {i + 1}: " + " ".join(line.split(": ", 1)[-1] for line in note.splitlines())
            for i, note in enumerate(notes))
        answer += f"\n\nPlan: {rng.choice(_ADVICE)}; {rng.choice(_ADVICE)}.\n\nKind regards"
    return {"id": f"task-{rng.randrange(10**8)}",
            "conversations": [{"from": "human", "value": prompt}, {"from": "agent", "value": answer}]}


_SOURCES = {"medical_qa": (_medical_qa, 0.35), "exam_mcq": (_exam_mcq, 0.15), "patient_chat": (_patient_chat, 0.3),
            "clinical_tasks": (_clinical_task, 0.2)}


def write_synthetic_instructions(out_dir, samples: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Write the four JSONL files (about `samples` records in all, split as Me-LLaMA's mix leans:
    short QA most, long tasks fewest) into out_dir; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, (name, (make, share)) in enumerate(_SOURCES.items()):
        rng = random.Random(f"sft:{seed}:{index}")
        paths[name] = write_jsonl(out / f"{name}.jsonl", (make(rng) for _ in range(max(1, round(samples * share)))))
    return paths


# The one-word answers (PubMedQA, MedNLI) come three times as often as the long ones (NER spans,
# summaries): a loss on answer tokens otherwise hears them 40 times less than the NER's HTML.
_MIBE_FORMAT_ROTATION = ("pubmedqa", "mednli", "pubmedqa", "mednli", "i2b2", "pubmedqa", "mednli", "pubmedsum")


def write_mibe_format_instructions(out_dir, samples: int, seed: int = 0, held_out=()) -> Path:
    """Write mibe_format.jsonl into out_dir: `samples` conversations (the tasks in turn), each the
    query of a record made by mibe.RECORD_MAKERS and its gold answer (yes/no/maybe, an NLI label, HTML
    spans, a one-sentence summary), from a random stream of their own. A query in `held_out` (the test
    records') is never written: the same words and numbers can come up again by chance."""
    held_out = set(held_out)
    rngs = {name: random.Random(f"sft-mibe:{seed}:{index}") for index, name in enumerate(RECORD_MAKERS)}
    conversations = []
    while len(conversations) < samples:
        name = _MIBE_FORMAT_ROTATION[len(conversations) % len(_MIBE_FORMAT_ROTATION)]
        record = RECORD_MAKERS[name](rngs[name])
        if record["query"] not in held_out:
            conversations.append({"id": f"mibe-{name}-{len(conversations)}", "conversations": [
                {"from": "human", "value": record["query"]}, {"from": "gpt", "value": record["answer"]}]})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_jsonl(Path(out_dir) / "mibe_format.jsonl", conversations)
