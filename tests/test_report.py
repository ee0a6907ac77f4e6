"""`melama report` (issue 21): its numbers are the files' numbers, a resumed run is one curve,
incomparable inputs stay apart with their reason, the pictures are PNGs of the stated size (or,
without matplotlib, the report says how to get them), and mistakes end in one `error:` line.
Every input is a hand-written file in the trainer's, eval-ppl's or melama eval's format; expected
values are derived by hand from what the files hold."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest

from melama_mcore.cli import main as melama
from melama_mcore.report.build import make_report

TOKENS_PER_STEP = 2048  # 16 sequences of 128 tokens


def step_record(step: int, loss: float, *, lr: float = 1e-3, tokens: int = TOKENS_PER_STEP, seconds: float = 0.5,
                mfu: float | None = None) -> dict:
    """A step record as MetricsLogger.log_step writes it."""
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": 1.0, "step_time_s": seconds, "skipped": False,
              "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds, "tflops_per_gpu": 0.01,
              "memory_gib": 0.4}
    if mfu is not None:
        record["mfu"] = mfu
    return record


def eval_record(step: int, losses: dict[str, float]) -> dict:
    return {"step": step, "eval": {name: {"loss": loss, "ppl": 2.0 ** loss} for name, loss in losses.items()}}


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def write_ppl(folder: Path, perplexities: dict[str, float], *, seq_length: int = 128, tokens: int = 4096,
              step: int | None = None, tokenizer: dict | None = None) -> Path:
    """A perplexity.json; the loss is a stand-in (the report copies it, it does not recompute it)."""
    data = {"checkpoint": f"/ckpt/{folder.name}", "seq_length": seq_length,
            "sources": {name: {"loss": ppl / 100, "perplexity": ppl, "tokens": tokens, "sequences": 32}
                        for name, ppl in perplexities.items()}}
    if step is not None:
        data["step"] = step
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    folder.mkdir(parents=True)
    (folder / "perplexity.json").write_text(json.dumps(data, indent=1))
    return folder


def protocol(**changes) -> dict:
    out = {"extractor": "strict", "template": {"name": None, "source": "none"}, "limit": None, "max_new_tokens": 256,
           "num_fewshot": None, "backend": "hf", "model": "m"}
    out.update(changes)
    return out


def write_results(folder: Path, tasks: dict, protocol_: dict | None) -> Path:
    data = dict(tasks)
    if protocol_ is not None:
        data["protocol"] = protocol_
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(data, indent=2))
    return folder


TOKENIZER_A = {"path": "/a/tokenizer.model", "vocab_size": 32000, "vocab_hash": "aaaa1111"}
TOKENIZER_B = {"path": "/b/tokenizer.model", "vocab_size": 32000, "vocab_hash": "bbbb2222"}


def test_the_reports_numbers_are_the_files_numbers(tmp_path):
    run = write_run(tmp_path / "me-llama", [
        step_record(1, 6.5, lr=3e-4, mfu=0.41), step_record(5, 5.25, lr=2e-4, mfu=0.43),
        eval_record(5, {"biomedical": 5.5, "general": 5.75}), step_record(10, 4.75, lr=1e-4, mfu=0.42),
        eval_record(10, {"biomedical": 5.0, "general": 5.5})])
    checkpoint = run / "checkpoints" / "iter_0000010"  # what the report reads of a checkpoint: its config.yaml
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text("run_name: me-llama\ntraining:\n  seq_length: 128\n  global_batch_size: 16\n")
    (run / "checkpoints" / "latest").write_text("10")
    base = write_ppl(tmp_path / "ppl" / "base", {"biomedical": 20.0, "clinical": 40.0, "general": 10.0},
                     tokenizer=TOKENIZER_A)
    cont = write_ppl(tmp_path / "ppl" / "me-llama", {"biomedical": 15.0, "clinical": 30.0, "general": 10.5},
                     tokenizer=TOKENIZER_A)
    scores = {"pubmedqa": {"accuracy": 0.5, "macro_f1": 0.25, "accuracy@mibe-compat": 0.5, "empty_generations": 3},
              "mmlu": {"accuracy": 0.4375}}
    base_eval = write_results(tmp_path / "eval" / "base", scores, protocol())
    chat_eval = write_results(tmp_path / "eval" / "chat", {
        "pubmedqa": {"accuracy": 0.625, "macro_f1": 0.5, "accuracy@mibe-compat": 0.75, "empty_generations": 0},
        "mmlu": {"accuracy": 0.40625}}, protocol(model="chat"))
    out = tmp_path / "report"
    report = make_report([run, cont, base, chat_eval, base_eval], out, baseline="base")  # the baseline first
    data = json.loads((out / "report.json").read_text())
    assert data == json.loads(json.dumps(report.data))

    (curve,) = data["runs"]
    assert curve["train"]["step"] == [1, 5, 10]
    assert curve["settings"] == {"run_name": "me-llama", "preset": None, "seq_length": 128, "global_batch_size": 16,
                                 "train_iters": None, "tokenizer": None, "peft": None}
    assert curve["train"]["loss"] == [6.5, 5.25, 4.75] and curve["train"]["lr"] == [3e-4, 2e-4, 1e-4]
    assert curve["train"]["mfu"] == [0.41, 0.43, 0.42]
    assert curve["train"]["tokens"] == [2048, 5 * 2048, 10 * 2048]
    assert curve["validation"]["general"] == {"step": [5, 10], "tokens": [5 * 2048, 10 * 2048],
                                              "loss": [5.75, 5.5], "perplexity": [2 ** 5.75, 2 ** 5.5]}

    (group,) = data["perplexity"]
    assert group["models"] == ["base", "me-llama"] and group["apart_reason"] is None
    assert group["sources"]["clinical"]["me-llama"]["perplexity"] == 30.0
    assert group["sources"]["clinical"]["me-llama"]["loss"] == 0.3
    assert group["sources"]["biomedical"]["me-llama"]["change_pct"] == pytest.approx(-25.0)
    assert group["sources"]["general"]["me-llama"]["change_pct"] == pytest.approx(5.0)
    assert group["sources"]["general"]["base"]["change_pct"] is None

    (scored,) = data["scores"]
    pubmedqa = scored["tasks"]["pubmedqa"]
    assert pubmedqa["suite"] == "MIBE" and scored["tasks"]["mmlu"]["suite"] == "lm-eval"
    assert list(pubmedqa["metrics"]) == ["accuracy", "macro_f1", "accuracy@mibe-compat"]
    assert pubmedqa["metrics"]["accuracy"]["chat"] == {"value": 0.625, "change": 0.125}
    assert pubmedqa["metrics"]["accuracy@mibe-compat"]["chat"]["change"] == 0.25
    assert scored["tasks"]["mmlu"]["metrics"]["accuracy"]["chat"]["change"] == -0.03125
    assert scored["diagnostics"] == {"pubmedqa": {"base": {"empty_generations": 3}, "chat": {"empty_generations": 0}}}

    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for row in ("| clinical | 40 | 30 | -25.00% |", "| general | 10 | 10.5 | +5.00% |",
                "| MIBE | PubMedQA (pubmedqa) | accuracy | 0.5000 | 0.6250 | +0.1250 |",
                "| lm-eval | mmlu | accuracy | 0.4375 | 0.4062 | -0.0312 |",
                "| me-llama | 10 | 20,480 | 4.7500 | 4,096 | 42.0% | 1 |"):
        assert row in markdown
        assert "<tr><td>" + row.strip("| ").replace(" | ", "</td><td>") + "</td></tr>" in html


def test_a_resumed_run_is_one_curve(tmp_path):
    """Steps 1-6 logged, the checkpoint at 4; the resumed process (twice the batch) logs 5-8 again:
    its records replace 5, 6 and the validation at 6; the final validation repeats the one at 8."""
    first = [step_record(s, 10.0 - s) for s in range(1, 7)]
    first.insert(4, eval_record(4, {"general": 7.0}))
    first.append(eval_record(6, {"general": 6.0}))
    resumed = [step_record(s, 20.0 - s, tokens=2 * TOKENS_PER_STEP) for s in range(5, 9)]
    resumed += [eval_record(8, {"general": 5.0}), eval_record(8, {"general": 5.0})]
    run = write_run(tmp_path / "run", first + resumed)
    data = make_report([run], tmp_path / "report").data
    (curve,) = data["runs"]
    assert curve["train"]["step"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert curve["train"]["loss"] == [9.0, 8.0, 7.0, 6.0, 15.0, 14.0, 13.0, 12.0]
    assert curve["train"]["tokens"] == [s * TOKENS_PER_STEP for s in range(1, 5)] + [
        4 * TOKENS_PER_STEP + k * 2 * TOKENS_PER_STEP for k in range(1, 5)]
    assert curve["validation"]["general"]["step"] == [4, 8]
    assert curve["validation"]["general"]["loss"] == [7.0, 5.0]
    assert curve["segments"] == 2 and curve["superseded_records"] == 4  # steps 5, 6; validations at 6 and 8
    assert "(2 segments)" in (tmp_path / "report" / "report.md").read_text()


def test_incomparable_inputs_are_kept_apart_with_their_reason(tmp_path):
    ppl = tmp_path / "ppl"
    inputs = [write_ppl(ppl / "base", {"general": 10.0}, tokenizer=TOKENIZER_A),
              write_ppl(ppl / "long", {"general": 8.0}, tokenizer=TOKENIZER_A, seq_length=4096),
              write_ppl(ppl / "cont", {"general": 11.0}, tokenizer=dict(TOKENIZER_A, path="/elsewhere")),
              write_ppl(ppl / "other-vocab", {"general": 9.0}, tokenizer=TOKENIZER_B),
              write_ppl(ppl / "older", {"general": 12.0}),
              write_results(tmp_path / "eval" / "base", {"pubmedqa": {"accuracy": 0.5}}, protocol()),
              write_results(tmp_path / "eval" / "compat", {"pubmedqa": {"accuracy": 0.75}},
                            protocol(extractor="mibe-compat")),
              write_results(tmp_path / "eval" / "fewshot", {"pubmedqa": {"accuracy": 0.875}}, protocol(num_fewshot=3)),
              # A chat model prompted in its own template: the base's comparison, not a protocol apart.
              write_results(tmp_path / "eval" / "chat", {"pubmedqa": {"accuracy": 0.5625}},
                            protocol(template={"name": "me-llama", "source": "chat-lora/chat_template.jinja",
                                               "sha256": "636cc03b4b7a" + "0" * 52})),
              write_results(tmp_path / "eval" / "older", {"pubmedqa": {"accuracy": 0.625}}, None)]
    data = make_report(inputs, tmp_path / "report", baseline="base").data

    groups = {tuple(g["models"]): g for g in data["perplexity"]}
    assert list(groups) == [("base", "cont"), ("long",), ("other-vocab",), ("older",)]
    assert groups["base", "cont"]["sources"]["general"]["cont"]["change_pct"] == pytest.approx(10.0)
    assert "seq_length 4096, not 128" in groups["long",]["apart_reason"]
    assert "another tokenizer" in groups["other-vocab",]["apart_reason"]
    assert "does not record the tokenizer" in groups["older",]["apart_reason"]
    for models, value in ((("long",), 8.0), (("other-vocab",), 9.0), (("older",), 12.0)):
        assert groups[models]["sources"]["general"][models[0]] == {
            "loss": value / 100, "perplexity": value, "tokens": 4096, "sequences": 32, "change_pct": None}

    scores = {tuple(g["models"]): g for g in data["scores"]}
    assert list(scores) == [("base", "chat"), ("compat",), ("fewshot",), ("older",)]
    assert scores["base", "chat"]["tasks"]["pubmedqa"]["metrics"]["accuracy"]["chat"] == {"value": 0.5625,
                                                                                        "change": 0.0625}
    assert scores["compat",]["apart_reason"] == "extractor mibe-compat, not strict as base, chat"
    assert scores["fewshot",]["apart_reason"] == "num_fewshot 3, not none as base, chat"
    assert "records no protocol" in scores["older",]["apart_reason"]
    assert scores["older",]["tasks"]["pubmedqa"]["metrics"]["accuracy"] == {"older": {"value": 0.625, "change": None}}

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Group 2 is shown apart, not comparable with group 1: scored at seq_length 4096" in markdown
    assert "Group 2 is shown apart, not comparable with group 1: extractor mibe-compat, not strict as base, chat." in markdown
    assert "base: backend hf, model m, prompts plain prompts; chat: backend hf, model m, prompts me-llama (sha256 636cc03b4b7a)." in markdown


def test_a_folder_of_perplexity_outputs_is_one_checkpoint_series(tmp_path):
    base = write_ppl(tmp_path / "base", {"general": 10.0, "biomedical": 20.0})
    series = tmp_path / "run-ppl"
    write_ppl(series / "iter_0000200", {"general": 11.0, "biomedical": 15.0}, step=200)
    write_ppl(series / "iter_0000100", {"general": 10.5, "biomedical": 18.0})  # no "step": the folder's number
    (series / "data_cache").mkdir()
    data = make_report([base, series], tmp_path / "report").data
    (item,) = data["perplexity_series"]
    assert item["steps"] == [100, 200] and item["baseline"] == "base"
    assert item["sources"]["biomedical"]["perplexity"] == [18.0, 15.0]
    assert item["sources"]["biomedical"]["change_pct"] == pytest.approx([-10.0, -25.0])
    assert data["perplexity"][0]["sources"]["general"]["run-ppl"]["perplexity"] == 11.0  # the last checkpoint
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| 100 | 10.5 | +5.00% | 18 | -10.00% |" in markdown and "run-ppl (step 200)" in markdown


def test_the_pictures_are_pngs_of_the_stated_size_and_the_html_holds_them(tmp_path, monkeypatch):
    from PIL import Image

    from melama_mcore.report import figures

    run = write_run(tmp_path / "run", [step_record(1, 5.0), step_record(2, 4.0), eval_record(2, {"general": 4.5})])
    series = tmp_path / "ppl"
    write_ppl(series / "iter_0000001", {"general": 12.0})
    write_ppl(series / "iter_0000002", {"general": 11.0})
    scores = write_results(tmp_path / "eval", {"pubmedqa": {"accuracy": 0.5}}, protocol())
    out = tmp_path / "report"
    data = make_report([run, series, scores], out).data
    assert data["figures"] == ["training_loss.png", "validation_loss.png", "learning_rate.png", "throughput.png",
                               "perplexity_1.png", "perplexity_steps_1.png", "scores_1.png"]
    html = (out / "report.html").read_text()
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    for name, png in zip(data["figures"], embedded, strict=True):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.size == (figures.SIZE[0] * figures.DPI, figures.SIZE[1] * figures.DPI) == (800, 450)
        assert (out / name).read_bytes() == png
    text = re.sub(r"base64,[^\"]+", "", html)
    assert "<script" not in text and "http" not in text and "<link" not in text  # nothing fetched: opens offline

    # Without matplotlib (the import fails): the tables, and how to get the pictures; the old ones go.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    data = make_report([run, series, scores], out).data
    assert data["figures"] == [] and not list(out.glob("*.png"))
    markdown = (out / "report.md").read_text()
    assert "No pictures: matplotlib is not installed: pip install 'melama-mcore[report]'" in markdown
    assert "| 1 | 12 |" in markdown and "![" not in markdown


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


MISTAKES = {
    "missing path": (lambda t: [str(t / "nowhere")], "does not exist"),
    "none of the three": (lambda t: [str(_mkdir(t / "empty"))], "is not an input of melama report"),
    "empty run": (lambda t: [str(write_run(t / "run", []))], "no training step logged yet"),
    "corrupt metrics line": (lambda t: [str(_corrupt_metrics(t))], "metrics.jsonl:2: not valid JSON"),
    "corrupt perplexity.json": (lambda t: [str(_corrupt_ppl(t))], "perplexity.json:3: not valid JSON"),
    "not a results.json": (lambda t: [str(_write(t / "eval" / "results.json", '{"pubmedqa": [1]}'))],
                           "task 'pubmedqa' is not an object of metric numbers"),
    "unknown baseline": (lambda t: [str(write_ppl(t / "base", {"g": 1.0})), "--baseline", "chat"],
                         "--baseline 'chat' is not the label of an eval-ppl or melama eval input (labels: base)"),
    "one label twice": (lambda t: [str(write_ppl(t / "a" / "base", {"g": 1.0})),
                                   str(write_ppl(t / "b" / "base", {"g": 2.0}))], "are both labelled 'base'"),
    "unwritable --out": (lambda t: [str(write_ppl(t / "base", {"g": 1.0})), "--out", str(_write(t / "f", "x"))],
                         "--out"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _corrupt_metrics(tmp: Path) -> Path:
    run = write_run(tmp / "run", [step_record(1, 5.0)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo\n')
    return run


def _corrupt_ppl(tmp: Path) -> Path:
    return _write(tmp / "ppl" / "perplexity.json", '{\n "seq_length": 128,\n "sources": {,}\n}\n').parent


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_end_in_one_error_line(mistake, tmp_path, capsys):
    make_args, expected = MISTAKES[mistake]
    args = make_args(tmp_path)
    out = [] if "--out" in args else ["--out", str(tmp_path / "report")]
    assert melama(["report", *out, *args]) == 2
    line = _error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "report" / "report.md").exists()


def test_the_command_writes_the_report_and_says_where(tmp_path, capsys):
    ppl = write_ppl(tmp_path / "p", {"general": 10.0})
    assert melama(["report", "--out", str(tmp_path / "r"), str(ppl / "perplexity.json"), "--label", "base"]) == 0
    assert f"wrote {tmp_path / 'r' / 'report.html'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "report.json").read_text())["inputs"][0]["label"] == "base"


def test_bertscore_of_another_scorer_is_shown_without_a_change(tmp_path):
    """bertscore_f1 depends on the BERTScore model and layer (results.json's protocol.bertscore):
    under another scorer than the baseline's its value is shown, its change is not; ROUGE's is."""
    paper = {"model": "bert-base-multilingual-cased", "path": "/m", "layer": 9, "identified_by": "config name"}
    other = dict(paper, model="roberta-large", layer=17)
    summary = lambda rouge, bert: {"pubmedsum": {"rouge_1": rouge, "bertscore_f1": bert}}  # noqa: E731
    inputs = [write_results(tmp_path / "base", summary(0.25, 0.5), protocol(bertscore=paper)),
              write_results(tmp_path / "same", summary(0.5, 0.75), protocol(bertscore=paper)),
              write_results(tmp_path / "other", summary(0.375, 0.625), protocol(bertscore=other))]
    data = make_report(inputs, tmp_path / "report", baseline="base").data
    [group] = data["scores"]
    metrics = group["tasks"]["pubmedsum"]["metrics"]
    assert metrics["bertscore_f1"]["same"] == {"value": 0.75, "change": 0.25}
    assert metrics["bertscore_f1"]["other"] == {"value": 0.625, "change": None}
    assert metrics["rouge_1"]["other"] == {"value": 0.375, "change": 0.125}
    assert group["notes"] == ["bertscore_f1 of other was scored with BERTScore roberta-large layer 17, not "
                              "bert-base-multilingual-cased layer 9 as base: its change is not shown"]
