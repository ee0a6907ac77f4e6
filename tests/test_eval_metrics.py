"""MIBE scoring on hand-made predictions: every expected value is derived by hand in the comment next
to it, and each extractor is checked on outputs that expose its rules (the released scorer's quirks
for `mibe-compat`)."""

from __future__ import annotations

import pytest
import torch

from melama_mcore.eval import harness, metrics
from melama_mcore.eval.extraction import compat_choice, compat_multilabel, extract, html_to_bio, spans_to_html, \
    strict_choice, strict_multilabel
from melama_mcore.eval.tasks import TASKS

YNM = ["yes", "no", "maybe"]
LETTERS = ["A", "B", "C", "D", "E"]


# ---------------------------------------------------------------------------------------------
# One label: accuracy, macro-F1, missing answers
# ---------------------------------------------------------------------------------------------
def test_accuracy_macro_f1_and_missing_rate():
    golds = [0, 0, 1, 1, 2]
    preds = [0, None, 1, 0, None]  # two missing answers
    assert metrics.accuracy(preds, golds) == pytest.approx(2 / 5)
    assert metrics.missing_rate(preds) == pytest.approx(2 / 5)
    # class 0: TP 1, FP 1 (record 3), FN 1 (record 1) -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 1, FP 0, FN 1 (record 3)             -> P 1, R 1/2, F1 2/3
    # class 2: TP 0, FN 1 (missing)                     -> F1 0
    assert metrics.macro_f1(preds, golds) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_macro_f1_averages_over_gold_labels_only():
    # Label 2 is predicted once but never gold: left out of the average, as the released scorer does.
    # class 0: TP 1, FN 1 -> F1 2/3; class 1: TP 2 -> F1 1
    assert metrics.macro_f1([2, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)


def test_multilabel_macro_f1_hoc():
    golds = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
    preds = [[0], [1, 2], None, [2]]  # indices; the third answer named no label
    # multi-hot preds: [1,0,0] [0,1,1] [0,0,0] [0,0,1]
    # label 0: gold 1,0,1,0 pred 1,0,0,0 -> TP 1, FN 1        -> F1 2/3
    # label 1: gold 0,1,1,0 pred 0,1,0,0 -> TP 1, FN 1        -> F1 2/3
    # label 2: gold 1,0,0,0 pred 0,1,0,1 -> TP 0, FP 2, FN 1  -> F1 0
    assert metrics.multilabel_macro_f1(preds, golds) == pytest.approx(4 / 9)
    assert metrics.missing_rate(preds) == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------------------------
# NER
# ---------------------------------------------------------------------------------------------
def test_entity_f1_with_partial_overlaps():
    gold = ["B-problem", "I-problem", "O", "O", "B-treatment", "O", "B-test", "I-test", "O", "O"]
    pred = ["O", "B-problem", "O", "O", "B-treatment", "O", "B-test", "I-test", "O", "B-problem"]
    # gold entities: problem 0-1, treatment 4, test 6-7 (3); predicted: problem 1 (overlaps, wrong
    # boundary), treatment 4, test 6-7, problem 9 (4); exact matches 2 -> P 2/4, R 2/3, F1 4/7
    assert metrics.entity_f1([gold], [pred]) == pytest.approx(4 / 7)
    # the same span with the wrong type is wrong too: 1 of 1 gold, 0 correct
    assert metrics.entity_f1([["B-test", "I-test"]], [["B-treatment", "I-treatment"]]) == 0.0


def test_html_output_to_bio_over_record_tokens():
    tokens = "The patient reported chest pain and was given aspirin after an ECG .".split()
    gold = ["O", "O", "O", "B-problem", "I-problem", "O", "O", "O", "B-treatment", "O", "O", "B-test", "O"]
    assert html_to_bio(spans_to_html(tokens, gold), tokens) == gold  # the answer format round-trips
    output = ('The patient reported chest <span class="problem">pain</span> and was given '
              '<span class="treatment">Aspirin</span> after an <span class="test">ECG</span>.')
    pred = html_to_bio(output, tokens)
    assert pred == ["O", "O", "O", "O", "B-problem", "O", "O", "O", "B-treatment", "O", "O", "B-test", "O"]
    # "pain" alone is a partial overlap of "chest pain": 2 of 3 predicted and gold entities -> F1 2/3
    assert metrics.entity_f1([gold], [pred]) == pytest.approx(2 / 3)
    # Two adjacent spans of one type stay two entities; words the output changed are O.
    two = html_to_bio('<span class="problem">chest</span><span class="problem">pain</span>', ["chest", "pain"])
    assert two == ["B-problem", "B-problem"]
    assert html_to_bio("nothing tagged here", ["chest", "pain"]) == ["O", "O"]


# ---------------------------------------------------------------------------------------------
# Summaries and extractive QA
# ---------------------------------------------------------------------------------------------
def test_rouge():
    # ref "the cat sat on the mat" (6 words), pred "the cat on the mat" (5):
    # ROUGE-1: 5 shared words -> P 1, R 5/6, F 10/11; ROUGE-2: pred bigrams the-cat, cat-on, on-the,
    # the-mat; 3 in ref (of 5) -> P 3/4, R 3/5, F 2/3; ROUGE-L: LCS 5 words -> F 10/11
    scores = metrics.rouge("the cat on the mat", "the cat sat on the mat")
    assert scores == pytest.approx({"rouge_1": 10 / 11, "rouge_2": 2 / 3, "rouge_l": 10 / 11})
    # order matters only to ROUGE-L: "d c b a" vs "a b c d": every word shared (R1 = 1), no bigram
    # shared (R2 = 0), longest common subsequence one word (P = R = 1/4)
    scores = metrics.rouge("d c b a", "a b c d")
    assert scores == pytest.approx({"rouge_1": 1.0, "rouge_2": 0.0, "rouge_l": 0.25})


def test_extractive_qa_strict_and_released_normalisation():
    # strict: SQuAD normalisation after the answer cue; "The" is an article
    assert metrics.exact_match(extract(TASKS["emrqa"], {}, "Answer: The left lower lobe.\nmore", "strict"),
                               "left lower lobe") == 1.0
    # pred [right lower lobe pneumonia] vs gold [left lower lobe]: 2 shared -> P 2/4, R 2/3, F1 4/7
    assert metrics.token_f1("right lower lobe pneumonia", "left lower lobe") == pytest.approx(4 / 7)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "lobe") == 0.0
    # the released normaliser makes characters the tokens and ignores spaces and punctuation:
    assert metrics.compat_exact_match("Left lowerlobe", "left lo wer lobe.") == 1.0
    assert metrics.exact_match("Left lowerlobe", "left lo wer lobe.") == 0.0
    # "aab" vs "ab": distinct shared characters {a, b} = 2 -> P 2/3, R 2/2, F1 4/5 (strict: 0)
    assert metrics.compat_token_f1("aab", "ab") == pytest.approx(4 / 5)
    assert metrics.token_f1("aab", "ab") == 0.0
    # an anagram is a perfect F1 (same character set and length), though not an exact match
    assert metrics.compat_token_f1("abc", "cab") == 1.0 and metrics.compat_exact_match("abc", "cab") == 0.0


# ---------------------------------------------------------------------------------------------
# BERTScore with a tiny random BERT built here (no download)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the patient was given aspirin and had chest pain no "
             "fever cough".split()]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def reference_bertscore(folder, candidate: str, reference: str) -> float:
    """BERTScore by its definition, in float64: last-layer token embeddings, cosine similarity, each
    token matched greedily (over all tokens, [CLS]/[SEP] included, as bert-score matches) and averaged
    over the words (special tokens excluded); F1 of the two averages."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(text):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[-1][0].double()
        return h / h.norm(dim=-1, keepdim=True)

    sim = embed(candidate) @ embed(reference).T
    precision, recall = sim.max(1).values[1:-1].mean(), sim.max(0).values[1:-1].mean()
    return (2 * precision * recall / (precision + recall)).item()


def test_bertscore_against_its_definition(tiny_bert):
    pairs = [("the patient had fever", "the patient had chest pain"), ("aspirin", "aspirin"), ("", "no fever")]
    expected = [reference_bertscore(tiny_bert, *pairs[0]), 1.0, 0.0]  # identical: 1; empty output: 0
    value = metrics.bertscore_f1([p for p, _ in pairs], [g for _, g in pairs], tiny_bert)
    assert value == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_bertscore_needs_a_local_model(monkeypatch, tiny_bert, tmp_path):
    monkeypatch.setenv(metrics.BERTSCORE_ENV, str(tiny_bert))
    assert harness.agg_bertscore_f1([("aspirin", "aspirin")]) == pytest.approx(1.0, abs=1e-6)
    monkeypatch.setenv(metrics.BERTSCORE_ENV, str(tmp_path))
    with pytest.raises(Exception, match="not a model folder"):
        metrics.bertscore_model()


# ---------------------------------------------------------------------------------------------
# mibe-compat: the released rule and its quirks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,output,expected", [
    ("medqa", "According to the guidelines the best option is D.", 0),  # capital A of "According" = A
    ("medqa", "the answer is b", None),                                 # case-sensitive: no capital letter
    ("pubmedqa", "It is not clear from the study.", 1),                 # "no" inside "not"
    ("pubmedqa", "Maybe, but yes on balance", 0),                       # first in choice order, not in text
    ("pubmedqa", "YES", 0),                                             # lower-cased before matching
    ("pubmedqa", "The study is inconclusive.", None),                   # nothing found: missing
    ("ddi", "DDI-effect", 1),
    ("ddi", "DDI-effect or DDI-mechanism", None),                       # DDI: exactly one, else missing
])
def test_mibe_compat_quirks(task, output, expected):
    choices = {"medqa": LETTERS, "pubmedqa": YNM,
               "ddi": ["DDI-false", "DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-int"]}[task]
    assert extract(TASKS[task], {"choices": choices}, output, "mibe-compat") == expected


def test_mibe_compat_substrings_of_longer_choices_and_hoc_case():
    specialties = ["Surgery", "Neurosurgery", "Cardiology"]
    # lower-cased substring: "surgery" occurs inside "neurosurgery" and comes first in the list
    assert compat_choice(specialties, "Neurosurgery", case_sensitive=False, unique=False) == 0
    assert strict_choice(specialties, "Neurosurgery") == 1
    hallmarks = ["sustaining proliferative signaling", "inducing angiogenesis", "resisting cell death"]
    text = "Sustaining proliferative signaling; inducing angiogenesis"
    assert compat_multilabel(hallmarks, text) == [1]          # case-sensitive: the capital S misses label 0
    assert strict_multilabel(hallmarks, text) == [0, 1]
    assert compat_multilabel(hallmarks, "none of these") is None


# ---------------------------------------------------------------------------------------------
# strict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choices,output,expected", [
    (LETTERS, "B", 1), (LETTERS, "(B) aspirin", 1), (LETTERS, "B. Aspirin is first line", 1),
    (LETTERS, "Answer: C", 2), (LETTERS, "**E**", 4), (LETTERS, "The answer is E.", 4),
    (LETTERS, "I think the answer is (C) because A is wrong", 2),
    (LETTERS, "According to the guidelines the best option is D.", 3),
    (LETTERS, "According to the guidelines, aspirin.", None),  # no letter is named
    (YNM, "yes", 0), (YNM, "Yes, because the trial was positive.", 0), (YNM, "no.", 1),
    (YNM, "Not sure.", None), (YNM, "nonsense", None), (YNM, "The evidence suggests maybe.", 2),
    (YNM, "It could be yes or no.", None),                      # two choices named: missing
    (YNM, "\n\n  maybe\nyes", 2),                               # the first non-empty line counts
    (["entailment", "contradiction", "neutral"], "Contradiction: the patient denies it", 1),
])
def test_strict_choice(choices, output, expected):
    assert strict_choice(choices, output) == expected


def test_strict_multilabel_reads_the_first_paragraph():
    hallmarks = ["sustaining proliferative signaling", "inducing angiogenesis", "resisting cell death"]
    assert strict_multilabel(hallmarks, "Inducing angiogenesis.\n\nresisting cell death") == [1]
    assert strict_multilabel(hallmarks, "none") is None
