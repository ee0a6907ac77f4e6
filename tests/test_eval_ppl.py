"""`melama eval-ppl` over a run's checkpoints (--all-checkpoints, --steps) and with --samples, through
the CLI, against independent references: separate eval-ppl calls per checkpoint, the validation loss
the trainer itself logged at every step, and token counts derived by hand (pre-training text: every
position of a sequence counts). One process each (the layouts are tested in test_sft_training.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from melama_mcore.cli import main as melama
from trunk_fixtures import data_overrides, run_train

pytestmark = pytest.mark.slow  # a training run and eval-ppl processes

SEQ_LENGTH = 32  # trunk_fixtures.TINY: micro-batches of 2 sequences, global batches of 8, one per validation
LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0", "optimizer.lr=1e-2"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A 3-step pre-training run with a checkpoint and a validation at every step, an interrupted
    save beside them, and its blend as a file."""
    root = tmp_path_factory.mktemp("ppl_run")
    out = root / "run"
    run_train(out, data_overrides(tiny_data) + ["checkpoint.save_interval=1", "logging.eval_interval=1"])
    (out / "checkpoints" / "iter_0000004.partial").mkdir()
    blend = root / "blend.yaml"
    blend.write_text(json.dumps({"sources": tiny_data["blend"]}))
    return {"dir": out, "blend": blend, "root": root}


def logged_validation(run_dir) -> dict[int, dict[str, float]]:
    """step -> {source: validation loss} as the trainer logged it."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {name: v["loss"] for name, v in r["eval"].items()} for r in records if "eval" in r}


def eval_ppl(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "melama_mcore.cli", "eval-ppl", *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read(path) -> dict:
    return json.loads(path.read_text())


def test_all_checkpoints_equal_separate_calls_and_the_runs_own_validation(run, tmp_path):
    out = tmp_path / "ppl"
    result = eval_ppl("--model", run["dir"], "--blend", run["blend"], "--out", out, "--all-checkpoints")
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_0000001", "iter_0000002", "iter_0000003"]
    said = result.stdout + result.stderr
    assert said.count("iter_0000004.partial") == 1
    assert "skipping 1 incomplete checkpoint folder(s) (interrupted saves): iter_0000004.partial" in said
    logged = logged_validation(run["dir"])
    for step in (1, 2, 3):
        report = read(out / f"iter_{step:07d}" / "perplexity.json")
        assert report["step"] == step and report["checkpoint"].endswith(f"iter_{step:07d}")
        for source, loss in logged[step].items():
            assert report["sources"][source]["loss"] == loss  # the same samples, weights and arithmetic
            assert report["sources"][source]["tokens"] == 8 * SEQ_LENGTH
    # The middle checkpoint's weights loaded over the first's give what a fresh model gives.
    alone = tmp_path / "alone"
    eval_ppl("--model", run["dir"] / "checkpoints" / "iter_0000002", "--blend", run["blend"], "--out", alone)
    single, in_series = read(alone / "perplexity.json"), read(out / "iter_0000002" / "perplexity.json")
    assert single["sources"] == in_series["sources"]
    assert single["step"] == 2 and single["tokenizer"] == in_series["tokenizer"]
    assert set(single["tokenizer"]) == {"path", "vocab_size", "vocab_hash"} and single["tokenizer"]["vocab_size"] == 512
    # The closing table: perplexity per source and step, as in the files.
    table = result.stdout[result.stdout.index("perplexity by step"):].splitlines()
    assert table[1].split() == ["source", "1", "2", "3"]
    general = next(line.split() for line in table if line.startswith("general"))
    assert general[1:] == [f"{read(out / f'iter_{s:07d}' / 'perplexity.json')['sources']['general']['perplexity']:.2f}"
                           for s in (1, 2, 3)]

    # melama report reads the folder as one checkpoint series, numbers as in the files.
    assert melama(["report", "--out", str(tmp_path / "report"), str(out)]) == 0
    (series,) = read(tmp_path / "report" / "report.json")["perplexity_series"]
    assert series["steps"] == [1, 2, 3]
    for source in logged[1]:
        assert series["sources"][source]["loss"] == [
            read(out / f"iter_{s:07d}" / "perplexity.json")["sources"][source]["loss"] for s in (1, 2, 3)]


def test_steps_scores_those_checkpoints_only(run, tmp_path):
    """With --samples 8, the run's own count (one global batch): exactly the run's validation, no note."""
    out = tmp_path / "ppl"
    result = eval_ppl("--model", run["dir"] / "checkpoints", "--blend", run["blend"], "--out", out, "--steps", "3,1",
                      "--samples", "8")
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_0000001", "iter_0000003"]
    assert "--samples" not in result.stdout + result.stderr
    logged = logged_validation(run["dir"])
    for step in (1, 3):
        report = read(out / f"iter_{step:07d}" / "perplexity.json")
        assert {s: v["loss"] for s, v in report["sources"].items()} == logged[step]
        assert {v["sequences"] for v in report["sources"].values()} == {8}


@pytest.mark.parametrize("args, message", [
    (["--steps", "2,5,7"], "error: --steps: {run} has no checkpoint of step 5, 7; its checkpoints are of steps 1, 2, 3"),
    (["--all-checkpoints", "--model-is-one"], "error: --all-checkpoints scores the checkpoints of a run, but --model "
                                              "{one} is one checkpoint"),
])
def test_a_series_that_cannot_be_scored_is_refused_before_any_work(run, tmp_path, capsys, args, message):
    one = run["dir"] / "checkpoints" / "iter_0000002"
    model = one if "--model-is-one" in args else run["dir"]
    args = [a for a in args if a != "--model-is-one"]
    out = tmp_path / "ppl"
    code = melama(["eval-ppl", "--model", str(model), "--blend", str(run["blend"]), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message.format(run=run["dir"], one=one)), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_series_of_checkpoints_saved_with_another_model_is_refused(run, tmp_path, capsys):
    mixed = tmp_path / "mixed" / "checkpoints"
    for step in (1, 2):
        (mixed / f"iter_{step:07d}").mkdir(parents=True)
        config = (run["dir"] / "checkpoints" / f"iter_{step:07d}" / "config.yaml").read_text()
        (mixed / f"iter_{step:07d}" / "config.yaml").write_text(
            config if step == 2 else config.replace("preset: nano", "preset: tiny"))
        (mixed / f"iter_{step:07d}" / "metadata.json").write_text("{}")
    out = tmp_path / "ppl"
    code = melama(["eval-ppl", "--model", str(mixed.parent), "--blend", str(run["blend"]), "--out", str(out),
                   "--all-checkpoints"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {mixed / 'iter_0000001'} was saved with another model than"), err
    assert not out.exists()


def test_samples_scores_that_many_or_says_what_it_rounds_to(run, tmp_path):
    """3 is no whole number of micro-batches of 2: 4 are scored (4 x 32 tokens), said in one line."""
    ckpt = run["dir"] / "checkpoints" / "iter_0000003"
    result = eval_ppl("--model", ckpt, "--blend", run["blend"], "--out", tmp_path / "three", "--samples", "3")
    notes = [line for line in (result.stdout + result.stderr).splitlines() if "--samples 3" in line]
    assert len(notes) == 1 and "scoring 4 sequences per source instead" in notes[0], notes
    for values in read(tmp_path / "three" / "perplexity.json")["sources"].values():
        assert values["sequences"] == 4 and values["tokens"] == 4 * SEQ_LENGTH


def test_an_adapter_run_is_scored_checkpoint_by_checkpoint_on_its_base(run, tiny_data, tmp_path):
    lora = tmp_path / "lora"
    run_train(lora, data_overrides(tiny_data) + LORA + [
        "training.train_iters=2", "checkpoint.save_interval=1", "logging.eval_interval=1",
        f"checkpoint.init_from={run['dir'] / 'checkpoints' / 'iter_0000003'}"])
    out = tmp_path / "ppl"
    eval_ppl("--model", lora, "--blend", run["blend"], "--out", out, "--all-checkpoints")
    logged = logged_validation(lora)
    assert logged[2] != logged[1]  # the adapters changed the model: a stale reload would show
    for step in (1, 2):
        report = read(out / f"iter_{step:07d}" / "perplexity.json")
        assert {s: v["loss"] for s, v in report["sources"].items()} == logged[step]


def test_an_out_that_cannot_be_written_is_refused_before_any_work(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "ppl"
    code = melama(["eval-ppl", "--model", str(run["dir"]), "--blend", str(run["blend"]), "--out", str(out),
                   "--all-checkpoints"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: --out {out}: {tmp_path / 'file'} is a file, not a folder; choose another --out\n"


def test_an_out_holding_another_runs_series_is_refused(run, tmp_path, capsys):
    """melama report would read the other run's points as part of this run's curve."""
    out = tmp_path / "ppl"
    (out / "iter_0000005").mkdir(parents=True)
    (out / "iter_0000005" / "perplexity.json").write_text(json.dumps({"checkpoint": str(tmp_path / "other" / "iter_0000005")}))
    code = melama(["eval-ppl", "--model", str(run["dir"]), "--blend", str(run["blend"]), "--out", str(out),
                   "--all-checkpoints"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --out {out} already holds iter_0000005/perplexity.json"), err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000005"]


def test_another_tokenizer_is_refused_unless_the_user_means_it(run, corpus, tmp_path, capsys):
    """Issue 19.3 for eval-ppl: a --tokenizer of another vocabulary than the checkpoint's (same size,
    where no token-range check sees it) is refused before any work, naming both, with the override eval
    and export offer; with it, eval-ppl scores, saying so once for the checkpoint and once for the data."""
    from melama_mcore.data.train_tokenizer import train_sentencepiece

    other_spm_model = str(train_sentencepiece([str(corpus["clinical"])], str(tmp_path / "tok" / "other"),
                                              vocab_size=512))
    out = tmp_path / "ppl"
    args = ["eval-ppl", "--model", str(run["dir"]), "--blend", str(run["blend"]), "--out", str(out),
            "--tokenizer", other_spm_model]
    code = melama(args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --tokenizer {other_spm_model} (512 tokens, another vocabulary)") and "pass --allow-tokenizer-mismatch" in err
    assert not out.exists()
    result = eval_ppl(*args[1:], "--allow-tokenizer-mismatch", "--samples", "8")
    said = result.stdout + result.stderr
    assert said.count("using it anyway (--allow-tokenizer-mismatch)") == 1, said[-2000:]
    assert "training on it anyway (--allow-tokenizer-mismatch)" in said  # the data's tokenizer, too
    assert read(out / "perplexity.json")["tokenizer"]["path"] == other_spm_model
