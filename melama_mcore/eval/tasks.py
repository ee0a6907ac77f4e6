"""The twelve MIBE datasets: what each one is, where its test records come from, how it is scored.

One entry per dataset; the task YAMLs in lm_eval_tasks/ name the entry (`dataset_kwargs.mibe_task`)
and everything else (schema checks, label extraction, metrics, the results table) reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# How a dataset's answers are scored. Each kind has its record fields and its metrics.
CHOICE = "choice"              # one label out of `choices`, `gold` an index
MULTILABEL = "multilabel"      # any number of `choices`, `gold` multi-hot (HoC)
EXTRACTIVE_QA = "extractive_qa"  # free-text answer copied from the context (EmrQA)
NER = "ner"                    # entity spans over `token`, gold BIO tags in `label` (i2b2)
SUMMARY = "summary"            # free text against the reference `answer`

FIELDS = {  # required record fields per kind (records may carry more; they are ignored)
    CHOICE: ("query", "choices", "gold"),
    MULTILABEL: ("query", "choices", "gold"),
    EXTRACTIVE_QA: ("query", "answer"),
    NER: ("query", "token", "label"),
    SUMMARY: ("query", "answer"),
}

METRICS = {  # the metric names of results.json, per kind, in the table's column order
    CHOICE: ("accuracy", "macro_f1", "missing_rate"),
    MULTILABEL: ("macro_f1", "missing_rate"),
    EXTRACTIVE_QA: ("exact_match", "token_f1"),
    NER: ("entity_f1",),
    SUMMARY: ("rouge_1", "rouge_2", "rouge_l", "bertscore_f1"),
}
ALL_METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "entity_f1", "rouge_1", "rouge_2", "rouge_l",
               "bertscore_f1", "missing_rate")

GROUP = "mibe"
TASK_DIR = Path(__file__).parent / "lm_eval_tasks"  # pass to `lm_eval --include_path`
CHAT_FORMAT = "Human: \n{prompt}\n\nAssistant: \n"  # Me-LLaMA's chat wrapper, as its evaluation code applies it


@dataclass(frozen=True)
class MibeTask:
    name: str        # the task name (lm-eval and `melama eval --tasks`)
    dataset: str     # the dataset as the paper names it
    task_type: str   # the paper's task column
    kind: str
    hub: str | None  # public test set on the Hugging Face Hub; None: behind a data-use agreement
    # The released scorer's quirks, kept by `--extractor mibe-compat` (see extraction.py):
    compat_case_sensitive: bool = False  # choices matched without lower-casing
    compat_unique: bool = False          # exactly one choice may appear, else "missing"

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]


TASKS: dict[str, MibeTask] = {t.name: t for t in (
    MibeTask("pubmedqa", "PubMedQA", "QA", CHOICE, "clinicalnlplab/pubmedqa_test"),
    MibeTask("medqa", "MedQA", "QA", CHOICE, "clinicalnlplab/medQA_test", compat_case_sensitive=True),
    MibeTask("medmcqa", "MedMCQA", "QA", CHOICE, "clinicalnlplab/medMCQA_test", compat_case_sensitive=True),
    MibeTask("emrqa", "EmrQA", "QA", EXTRACTIVE_QA, None),
    MibeTask("i2b2", "2010 i2b2", "NER", NER, None),
    MibeTask("ddi", "DDI 2013", "relation extraction", CHOICE, "clinicalnlplab/DDI2013_test",
             compat_case_sensitive=True, compat_unique=True),
    MibeTask("hoc", "HoC", "classification", MULTILABEL, "clinicalnlplab/HoC_test", compat_case_sensitive=True),
    MibeTask("mtsample", "MTSample", "classification", CHOICE, "clinicalnlplab/MTSample_test"),
    MibeTask("pubmedsum", "PubMed", "summarisation", SUMMARY, "hippocrates/PubMed_Summ_test"),
    MibeTask("mimiccxr", "MIMIC-CXR", "summarisation", SUMMARY, None),
    MibeTask("bionli", "BioNLI", "NLI", CHOICE, "clinicalnlplab/BioNLI_test"),
    MibeTask("mednli", "MedNLI", "NLI", CHOICE, None),
)}
