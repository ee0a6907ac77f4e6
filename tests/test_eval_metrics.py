"""MIBE scoring on hand-made predictions: every expected value is derived by hand in the comment next
to it, and each extractor is checked on outputs that expose its rules (the released scorer's quirks
for `mibe-compat`, NER's released reading and alignment included); a task's results.json row with
both extractors and its counts; BERTScore's layer from the model's identity."""

from __future__ import annotations

import json

import pytest
import torch

from melama_mcore.eval import harness, metrics
from melama_mcore.eval.data import check_record
from melama_mcore.eval.extraction import compat_choice, compat_multilabel, compat_ner, extract, html_to_bio, \
    released_alignment, released_pairs, spans_to_html, strict_choice, strict_multilabel
from melama_mcore.eval.scoring import Generated, score, task_result
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


def test_entity_details_exact_and_overlap_per_type():
    gold = [["B-problem", "I-problem", "O", "B-test", "O"], ["B-problem", "O", "B-treatment", "I-treatment"]]
    pred = [["O", "B-problem", "O", "B-test", "O"], ["B-problem", "O", "B-test", "I-test"]]
    # record 1: gold problem 0-1, test 3; pred problem 1 (overlaps problem 0-1), test 3 (exact)
    # record 2: gold problem 0, treatment 2-3; pred problem 0 (exact), test 2-3 (wrong type: no match)
    # problem: gold 2, pred 2, exact 1, overlap: preds 2 hit, golds 2 hit -> P 1/2 R 1/2 F 1/2; overlap 1, 1, 1
    # test: gold 1, pred 2, exact 1, overlapping preds 1 (test 2-3 meets no gold test) -> P 1/2 R 1 F 2/3;
    #       overlap P 1/2 R 1 F 2/3
    # treatment: gold 1, pred 0 -> P 0 R 0 F 0 (both ways)
    # all: gold 4, pred 4, exact 2 -> P R F 1/2; overlap: preds hit 3 (problem 2, test 1) -> P 3/4,
    #      golds hit 3 (problem 2, test 1) -> R 3/4, F 3/4
    d = metrics.entity_details(gold, pred)
    assert d == pytest.approx({
        "entity_precision": 1 / 2, "entity_recall": 1 / 2, "entity_f1": 1 / 2,
        "entity_precision_overlap": 3 / 4, "entity_recall_overlap": 3 / 4, "entity_f1_overlap": 3 / 4,
        "entity_precision.problem": 1 / 2, "entity_recall.problem": 1 / 2, "entity_f1.problem": 1 / 2,
        "entity_precision_overlap.problem": 1.0, "entity_recall_overlap.problem": 1.0, "entity_f1_overlap.problem": 1.0,
        "entity_precision.test": 1 / 2, "entity_recall.test": 1.0, "entity_f1.test": 2 / 3,
        "entity_precision_overlap.test": 1 / 2, "entity_recall_overlap.test": 1.0, "entity_f1_overlap.test": 2 / 3,
        "entity_precision.treatment": 0.0, "entity_recall.treatment": 0.0, "entity_f1.treatment": 0.0,
        "entity_precision_overlap.treatment": 0.0, "entity_recall_overlap.treatment": 0.0,
        "entity_f1_overlap.treatment": 0.0})
    assert d["entity_f1"] == pytest.approx(metrics.entity_f1(gold, pred))  # seqeval's own number


GOLD_HTML = 'Pt had <span class="problem">chest pain</span> ; given <span class="treatment">aspirin</span> .'


def test_released_reading_of_html():
    # top-level text is split at spaces (so "pain." would stay one word); element text is tokenised
    assert released_pairs('a <span class="problem">chest pain.</span> b.') == [
        ("a", "O"), ("chest", "B-problem"), ("pain", "I-problem"), (".", "I-problem"), ("b.", "O")]
    # only the released types count; the first class is the type; nested elements belong to the top one;
    # an element without a class, or a void element, is O / nothing
    assert released_pairs('<span class="symptom">cough</span> <b class="test x"><i>CT</i> scan</b> <p>x</p><br>') == [
        ("cough", "O"), ("CT", "B-test"), ("scan", "I-test"), ("x", "O")]


def test_released_alignment():
    pred = [("chest", "B-problem"), ("painful", "I-problem"), ("day", "O")]
    gold = [("chest", "B-problem"), ("pain", "I-problem"), ("ful", "O"), ("day", "O"), ("x", "O")]
    # chest=chest; "painful" starts with "pain": (pain, I-problem, I-problem), "ful" stays with its tag
    # continued (I-problem); "ful"="ful"; day=day; gold's "x" is past the end of pred: dropped
    assert released_alignment(pred, gold) == [("chest", "B-problem", "B-problem"), ("pain", "I-problem", "I-problem"),
                                              ("ful", "I-problem", "O"), ("day", "O", "O")]
    # a predicted token split by gold tokens; tokens that differ (q, r) are both skipped
    assert released_alignment([("ab", "O"), ("q", "O"), ("z", "O")],
                              [("a", "B-test"), ("b", "O"), ("r", "O"), ("z", "O")]) == [
        ("a", "O", "B-test"), ("b", "O", "O"), ("z", "O", "O")]
    # a gold token split by predicted ones: the rest of a B- token continues as I-
    assert released_alignment([("a", "O"), ("b", "O")], [("ab", "B-test")]) == [("a", "O", "B-test"),
                                                                               ("b", "O", "I-test")]


def test_ner_under_both_extractors_on_released_records():
    """i2b2 records in the released form (gold spans in `answer`, no token/label): strict counts every
    record, mibe-compat leaves out what it cannot align and types it does not know."""
    task = TASKS["i2b2"]
    docs = [{**check_record(task, {"query": "Tag it.", "answer": GOLD_HTML}, "test"), "mibe_index": 0},
            {**check_record(task, {"query": "Tag it.", "answer": '<span class="test">ECG</span> normal .'}, "test"),
             "mibe_index": 1}]
    assert docs[0]["token"] == ["Pt", "had", "chest", "pain", ";", "given", "aspirin", "."]
    assert docs[0]["label"] == ["O", "O", "B-problem", "I-problem", "O", "O", "B-treatment", "O"]
    outputs = ['Pt had <span class="problem">chest pain</span> ; given <span class="drug">aspirin</span> .', ""]
    # strict: record 1 finds problem (exact) and a "drug" aspirin (gold treatment: wrong type); record 2 misses
    # the test. Gold 3 entities, predicted 2, exact 1 -> P 1/2, R 1/3, F1 2/5
    strict = score(task, docs, outputs, "strict")
    assert strict["entity_f1"] == pytest.approx(2 / 5) and strict["unaligned_records"] == 0
    # mibe-compat: record 2's empty output aligns nothing and drops out; gold 2, predicted 2 (drug is a
    # released type), exact 1 -> P 1/2, R 1/2, F1 1/2
    compat = score(task, docs, outputs, "mibe-compat")
    assert compat["entity_f1"] == pytest.approx(1 / 2) and compat["unaligned_records"] == 1
    assert compat["entity_f1.problem"] == 1.0 and compat["entity_recall.treatment"] == 0.0
    assert compat_ner("", GOLD_HTML) == ([], [])


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
def write_tiny_bert(folder, layers: int = 2):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the patient was given aspirin and had chest pain no "
             "fever cough".split()]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def reference_bertscore(folder, candidate: str, reference: str, layer: int = -1) -> float:
    """BERTScore by its definition, in float64: the token embeddings of a layer, cosine similarity, each
    token matched greedily (over all tokens, [CLS]/[SEP] included, as bert-score matches) and averaged
    over the words (special tokens excluded); F1 of the two averages."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(text):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[layer][0].double()
        return h / h.norm(dim=-1, keepdim=True)

    sim = embed(candidate) @ embed(reference).T
    precision, recall = sim.max(1).values[1:-1].mean(), sim.max(0).values[1:-1].mean()
    return (2 * precision * recall / (precision + recall)).item()


def test_bertscore_against_its_definition(tiny_bert):
    pairs = [("the patient had fever", "the patient had chest pain"), ("aspirin", "aspirin"), ("", "no fever")]
    expected = [reference_bertscore(tiny_bert, *pairs[0]), 1.0, 0.0]  # identical: 1; empty output: 0
    model = metrics.identify_bertscore_model(tiny_bert)
    assert (model.name, model.layer) == (None, 2)  # not a model bert-score knows: its last layer
    value = metrics.bertscore_f1([p for p, _ in pairs], [g for _, g in pairs], model)
    assert value == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_bertscore_layer_from_the_model_identity(tmp_path):
    """The paper's model in the Hugging Face cache (a snapshot-hash folder) is scored at bert-score's
    layer for it (9), whatever its folder is called; a folder merely named like it is not."""
    cached = write_tiny_bert(tmp_path / "hub" / "models--bert-base-multilingual-cased" / "snapshots" /
                             "4f1ba2b0c5d0e5e3b8a3c1f2d9e8a7b6c5d4e3f2", layers=10)
    model = metrics.identify_bertscore_model(cached)
    assert model.describe() == {"model": "bert-base-multilingual-cased", "path": str(cached), "layer": 9,
                                "identified_by": "Hugging Face cache"}
    pair = ("the patient had fever", "the patient had chest pain")
    assert metrics.bertscore_f1([pair[0]], [pair[1]], model) == pytest.approx(
        reference_bertscore(cached, *pair, layer=9), abs=1e-6)  # hidden_states[9]: the 9th layer's output
    named = write_tiny_bert(tmp_path / "bert-base-multilingual-cased", layers=10)
    assert metrics.identify_bertscore_model(named).layer == 10  # the folder's name says nothing
    # the paper's model copied anywhere is told by its config; a config naming it, likewise
    config_only = tmp_path / "copy"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(metrics.BERTSCORE_DEFAULT_CONFIG))
    assert metrics.identify_bertscore_model(config_only).describe()["identified_by"] == "config"
    (config_only / "config.json").write_text(json.dumps({"_name_or_path": "google-bert/bert-base-multilingual-cased",
                                                         "num_hidden_layers": 12}))
    assert metrics.identify_bertscore_model(config_only).layer == 9
    (config_only / "config.json").write_text(json.dumps({"_name_or_path": "bert-base-multilingual-cased",
                                                         "num_hidden_layers": 4}))
    with pytest.raises(Exception, match="whose layer 9 it does not have"):
        metrics.identify_bertscore_model(config_only)


def test_bertscore_needs_a_local_model(monkeypatch, tiny_bert, tmp_path):
    monkeypatch.setenv(metrics.BERTSCORE_ENV, str(tiny_bert))
    assert harness.agg_bertscore_f1([({"mibe_task": "pubmedsum", "mibe_extractor": "strict", "mibe_index": 0,
                                       "answer": "aspirin"}, "aspirin")]) == pytest.approx(1.0, abs=1e-6)
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


# ---------------------------------------------------------------------------------------------
# A task's row of results.json: both extractors, their disagreement, the counts
# ---------------------------------------------------------------------------------------------
def test_task_result_row_with_both_extractors_and_counts():
    task = TASKS["pubmedqa"]
    golds = [0, 1, 2, 1]
    records = [Generated({"query": "q", "answer": "", "choices": YNM, "gold": g, "mibe_index": i}, out, cut, hit)
               for i, (g, out, cut, hit) in enumerate(zip(golds, ["yes", "It is not clear.", "maybe so", ""],
                                                          [0, 7, 0, 0], [False, True, False, False]))]
    row = task_result(task, list(reversed(records)), "mibe-compat").row  # listed in any order
    # mibe-compat: yes->0 (right), "not" contains "no"->1 (right), maybe->2 (right), ""->missing
    # strict: 0 (right), missing ("not" is no answer), 2 (right), missing
    # accuracy 3/4 vs 2/4; missing 1/4 vs 2/4; predictions differ on record 1 only -> disagreement 1/4
    # macro-F1 compat: class 0 F1 1, class 1 (gold twice, found once) P 1 R 1/2 F1 2/3, class 2 F1 1 -> 8/9
    # macro-F1 strict: class 0 1, class 1 (gold twice, never found) 0, class 2 1 -> 2/3
    assert row == pytest.approx({
        "accuracy": 3 / 4, "macro_f1": 8 / 9, "missing_rate": 1 / 4,
        "accuracy@strict": 2 / 4, "macro_f1@strict": 2 / 3, "missing_rate@strict": 2 / 4,
        "extractor_disagreement": 1 / 4, "records": 4, "truncated_prompts": 1, "max_prompt_tokens_cut": 7,
        "empty_generations": 1, "hit_max_new_tokens": 1})
    assert list(row)[:3] == ["accuracy", "macro_f1", "missing_rate"]
    strict = task_result(task, records, "strict").row
    assert strict["accuracy"] == row["accuracy@strict"] and strict["accuracy@mibe-compat"] == row["accuracy"]
    # counts nobody recorded (samples written by hand) are unknown, not zero
    unknown = task_result(task, [Generated(r.doc, r.generation) for r in records], "strict").row
    assert unknown["truncated_prompts"] is None and unknown["hit_max_new_tokens"] is None
    assert unknown["empty_generations"] == 1
