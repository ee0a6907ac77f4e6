"""A synthetic three-source demo corpus (biomedical abstracts, clinical notes, general web text).

Everything is generated from templates and word lists here: no real patients, papers or pages,
nothing downloaded. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from melama_mcore.output_paths import write_atomic

DISEASES = ["type 2 diabetes", "heart failure", "sepsis", "asthma", "COPD", "atrial fibrillation",
             "chronic kidney disease", "rheumatoid arthritis", "hypertension", "pneumonia",
             "major depressive disorder", "hepatocellular carcinoma", "multiple sclerosis",
             "Parkinson's disease", "acute myeloid leukemia", "psoriasis", "osteoporosis"]
DRUGS = ["metformin", "empagliflozin", "lisinopril", "apixaban", "atorvastatin", "prednisone",
          "vancomycin", "piperacillin-tazobactam", "salbutamol", "adalimumab", "sertraline",
          "furosemide", "insulin glargine", "amoxicillin", "levothyroxine", "tiotropium"]
GENES = ["TP53", "BRCA1", "EGFR", "KRAS", "IL-6", "TNF-alpha", "APOE", "PCSK9", "HER2", "JAK2"]
DESIGNS = ["a randomized controlled trial", "a retrospective cohort study", "a prospective cohort study",
            "a systematic review and meta-analysis", "a cross-sectional study", "a case-control study"]
OUTCOMES = ["all-cause mortality", "hospital readmission", "HbA1c reduction", "progression-free survival",
             "length of stay", "symptom burden", "quality of life", "major adverse cardiac events"]
SYMPTOMS = ["shortness of breath", "chest pain", "fever", "productive cough", "fatigue", "dizziness",
             "abdominal pain", "lower extremity edema", "nausea", "palpitations", "headache"]
FINDINGS = ["crackles at the bases", "a regular rate and rhythm", "mild tachycardia", "clear lungs",
             "2+ pitting edema", "a soft, non-tender abdomen", "decreased breath sounds on the left"]
TOPICS = ["home gardening", "budget travel", "learning to cook", "remote work", "city cycling",
           "photography", "personal finance", "hiking trails", "board games", "birdwatching"]
ADJ = ["simple", "practical", "surprising", "useful", "honest", "quick", "beginner-friendly"]
VERBS = ["plan", "start", "save money on", "get better at", "enjoy", "organise", "learn about"]


def biomedical_abstract(rng: random.Random) -> str:
    disease, drug, gene = rng.choice(DISEASES), rng.choice(DRUGS), rng.choice(GENES)
    n = rng.randint(40, 12000)
    hr = rng.uniform(0.55, 1.3)
    lo, hi = hr * rng.uniform(0.7, 0.95), hr * rng.uniform(1.05, 1.4)
    p = rng.choice(["<0.001", f"={rng.uniform(0.001, 0.2):.3f}"])
    parts = [
        f"Background: {disease.capitalize()} remains a leading cause of morbidity, and the role of "
        f"{drug} in patients with {gene} variants is uncertain.",
        f"Methods: We conducted {rng.choice(DESIGNS)} of {n} adults with {disease} "
        f"followed for a median of {rng.randint(6, 60)} months.",
        f"The primary outcome was {rng.choice(OUTCOMES)}; secondary outcomes included "
        f"{rng.choice(OUTCOMES)} and adverse events.",
        f"Results: Treatment with {drug} was associated with a hazard ratio of {hr:.2f} "
        f"(95% CI {lo:.2f}-{hi:.2f}; p{p}).",
        f"{gene} expression was {rng.choice(['higher', 'lower', 'unchanged'])} in responders "
        f"({rng.uniform(1, 40):.1f} vs {rng.uniform(1, 40):.1f} units).",
        f"Conclusions: {drug.capitalize()} {rng.choice(['may improve', 'did not change', 'modestly reduced'])} "
        f"{rng.choice(OUTCOMES)} in {disease}; further trials are warranted.",
    ]
    return " ".join(parts[: rng.randint(4, 6)])


def clinical_note(rng: random.Random) -> str:
    age, sex = rng.randint(19, 94), rng.choice(["male", "female"])
    disease, drug = rng.choice(DISEASES), rng.choice(DRUGS)
    lines = [
        f"CHIEF COMPLAINT: {rng.choice(SYMPTOMS)}.",
        f"HISTORY OF PRESENT ILLNESS: {age}-year-old {sex} with a history of {disease} and "
        f"{rng.choice(DISEASES)} presenting with {rng.randint(1, 14)} days of {rng.choice(SYMPTOMS)} "
        f"and {rng.choice(SYMPTOMS)}.",
        f"VITALS: T {rng.uniform(36.1, 39.4):.1f} C, HR {rng.randint(52, 131)}, "
        f"BP {rng.randint(92, 178)}/{rng.randint(50, 104)}, RR {rng.randint(12, 28)}, "
        f"SpO2 {rng.randint(86, 100)}% on {rng.choice(['room air', '2L NC', '4L NC'])}.",
        f"EXAM: notable for {rng.choice(FINDINGS)} and {rng.choice(FINDINGS)}.",
        f"LABS: WBC {rng.uniform(3, 22):.1f}, Hgb {rng.uniform(7, 16):.1f}, Cr {rng.uniform(0.5, 4.2):.2f}, "
        f"lactate {rng.uniform(0.6, 6):.1f}.",
        f"ASSESSMENT AND PLAN: {rng.choice(['Likely', 'Possible', 'Presumed'])} exacerbation of {disease}. "
        f"Start {drug} {rng.choice([5, 10, 20, 40, 500, 1000])} mg {rng.choice(['daily', 'BID', 'q8h'])}; "
        f"{rng.choice(['monitor electrolytes', 'repeat labs in AM', 'consult cardiology', 'PT/OT evaluation'])}.",
        f"DISPOSITION: {rng.choice(['admit to medicine', 'discharge home with follow-up', 'transfer to ICU'])}.",
    ]
    return "\n".join(lines[: rng.randint(5, 7)])


def general_text(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    sentences = [
        f"{rng.randint(3, 12)} {rng.choice(ADJ)} ways to {rng.choice(VERBS)} {topic}.",
        f"If you have ever wanted to {rng.choice(VERBS)} {topic}, this guide is for you.",
        f"Most people spend about {rng.randint(2, 40)} hours a month on it, and that is fine.",
        f"The first step is to set a {rng.choice(ADJ)} goal and write it down.",
        f"Next, ask a friend who already enjoys {rng.choice(TOPICS)} for advice.",
        f"In {rng.randint(1995, 2024)}, a small survey found that {rng.randint(10, 90)}% of readers "
        f"preferred {rng.choice(ADJ)} tips over long explanations.",
        "Finally, remember that progress beats perfection.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(3, 7)])


_SOURCES = {"biomedical": biomedical_abstract, "clinical": clinical_note, "general": general_text}


def write_jsonl(path: Path, records) -> Path:
    """The demo's files: one JSON record per line, written whole (output_paths.write_atomic)."""
    return write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def write_demo_corpus(out_dir, docs_per_source: int = 2000, seed: int = 0) -> dict[str, Path]:
    """Write biomedical.jsonl, clinical.jsonl, general.jsonl ({"text": ...} per line) into out_dir.

    Deterministic for a seed; the default (~2,000 documents per source) is about 2.5 MB and
    takes well under a second.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, (name, make) in enumerate(_SOURCES.items()):
        rng = random.Random(f"{seed}:{index}")  # one stream per source: sizes do not interact
        paths[name] = write_jsonl(out / f"{name}.jsonl", ({"text": make(rng)} for _ in range(docs_per_source)))
    return paths
