"""The twelve MIBE datasets: what each one is, where its test records come from, how it is scored.

This module is the one source of truth for MIBE's task facts: the kinds (record fields, headline
metrics), the generation budget, and one entry per dataset. The task YAMLs in lm_eval_tasks/ name
an entry (`dataset_kwargs.mibe_task`) and repeat for lm-eval what it needs to read (each kind's
`metric_list`, `max_gen_toks`, the group's task list); tests/test_eval_tasks.py checks every such
field against this module. Schema checks, label extraction, scoring and the results table read it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GENERATION_BUDGET = 256  # the paper's: at most 256 new tokens, greedy (the YAMLs' max_gen_toks)


@dataclass(frozen=True)
class Kind:
    """How a dataset's answers are scored."""
    name: str
    fields: tuple[str, ...]   # required record fields (records may carry more; they are kept, not used)
    metrics: tuple[str, ...]  # headline metrics: the YAML's metric_list and the table's columns, in order
    yaml: str                 # the lm_eval_tasks/ file its tasks include


CHOICE = Kind("choice", ("query", "choices", "gold"),  # one label out of `choices`, `gold` an index
              ("accuracy", "macro_f1", "missing_rate"), "_mibe_choice_yaml")
MULTILABEL = Kind("multilabel", ("query", "choices", "gold"),  # `gold` multi-hot over `choices` (HoC)
                  ("macro_f1", "missing_rate"), "_mibe_multilabel_yaml")
EXTRACTIVE_QA = Kind("extractive_qa", ("query", "answer"),  # a free-text answer copied from the context
                     ("exact_match", "token_f1"), "_mibe_extractive_qa_yaml")
# Entity spans: the released records carry the gold as HTML spans in `answer`; records may instead
# (or also) carry `token` and BIO `label` lists. data.check_record enforces one of the two.
NER = Kind("ner", ("query",), ("entity_f1",), "_mibe_ner_yaml")
SUMMARY = Kind("summary", ("query", "answer"),  # free text against the reference `answer`
               ("rouge_1", "rouge_2", "rouge_l", "bertscore_f1"), "_mibe_summary_yaml")
KINDS = (CHOICE, MULTILABEL, EXTRACTIVE_QA, NER, SUMMARY)

ALL_METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "entity_f1", "rouge_1", "rouge_2", "rouge_l",
               "bertscore_f1", "missing_rate")  # the results table's column order
# The entity types the released i2b2 scorer counts (others are read as O under mibe-compat).
RELEASED_ENTITY_TYPES = ("problem", "treatment", "test", "drug")

GROUP = "mibe"
TASK_DIR = Path(__file__).parent / "lm_eval_tasks"  # pass to `lm_eval --include_path`


@dataclass(frozen=True)
class MibeTask:
    name: str        # the task name (lm-eval and `melama eval --tasks`)
    dataset: str     # the dataset as the paper names it
    task_type: str   # the paper's task column
    kind: Kind
    hub: str | None  # public test set on the Hugging Face Hub; None: behind a data-use agreement
    # The released scorer's quirks, kept by `--extractor mibe-compat` (see extraction.py):
    compat_case_sensitive: bool = False  # choices matched without lower-casing
    compat_unique: bool = False          # exactly one choice may appear, else "missing"

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.kind.metrics


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
    # The released evaluation's PubMed set (`PubmedSum`); `hippocrates/PubMed_Summ_test` is the released
    # preprocessing's title-generation set, not this task.
    MibeTask("pubmedsum", "PubMed", "summarisation", SUMMARY, "clinicalnlplab/PubmedSumm_test"),
    MibeTask("mimiccxr", "MIMIC-CXR", "summarisation", SUMMARY, None),
    MibeTask("bionli", "BioNLI", "NLI", CHOICE, "clinicalnlplab/BioNLI_test"),
    MibeTask("mednli", "MedNLI", "NLI", CHOICE, None),
)}
