"""A tuned model is evaluated in the format it was tuned on, through the command lines a user runs.

One tiny LoRA run (`melama train`, 2 steps) on instruction data that `melama preprocess-sft` rendered
with llama2-chat and a default system prompt: its checkpoints' config.yaml keep the template, its
exports (export-hf, merged or not, and export-peft) carry it in their tokenizer files, and `melama eval
--model <run folder>` (the README's stage-3 command) finds the base through the run's init_from,
applies the adapters (the generations equal peft's on the exported base and adapter) and prompts in
the training format's prompt part, written out by hand here. The same for me-llama (a checkpoint that
holds its weights, exported whole) and a Jinja file (the run, its template swapped as another
preprocess-sft recorded it). Then what a user can get wrong: a tokenizer of another vocabulary, an
--adapter beside a LoRA run, and SIGTERM or Ctrl-C during the evaluation (nothing left in --out)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from convert_fixtures import relative_error
from sft_fixtures import RECORDS, write_jsonl
from trunk_fixtures import run_train

pytestmark = pytest.mark.slow

SYSTEM = "Answer briefly."
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0", "optimizer.lr=1e-2",
        "peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"]


def eval_cli(*args) -> tuple[int, str]:
    """`melama eval ARGS` in this process: exit status, and what it printed on stderr (its log too)."""
    from melama_mcore.cli import run_main
    from melama_mcore.eval.command import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_main(main, [str(a) for a in args])
    return code, err.getvalue()


def marker_template(root: Path, name: str, tokenizer: str, **options) -> dict:
    """The template preprocess-sft records (and the trainer copies into the run's config)."""
    from melama_mcore.data.sft.indexed import read_marker
    from melama_mcore.data.sft.preprocess import preprocess_sft

    src = write_jsonl(root / f"{name}.jsonl", [r for r, _, _ in RECORDS])
    preprocess_sft([src], str(root / name), tokenizer, workers=1, progress=False, **options)
    return read_marker(root / f"{name}_sft_document")["template"]


def with_template(folder: Path, out: Path, template: dict, **data) -> Path:
    """A copy of a run or checkpoint folder whose (latest) checkpoint's config.yaml records `template`
    as data.chat_template (as a run on data preprocessed with it would), and `data` keys."""
    shutil.copytree(folder, out)
    configs = sorted(out.rglob("config.yaml"))
    config = yaml.safe_load(configs[-1].read_text())
    config["data"].update(chat_template=template, **data)
    configs[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def tuned(spm_model, tmp_path_factory) -> dict:
    """The base (a random LLaMA of the nano shape, 512 positions, imported), the LoRA run tuned on it
    with llama2-chat and a system prompt, its instruction data's marker template, MIBE-shaped records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.checkpoint.convert import import_hf
    from melama_mcore.demo.mibe import write_demo_records
    from melama_mcore.data.sft.indexed import read_marker
    from melama_mcore.data.sft.preprocess import preprocess_sft
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.config_registry import PRESETS

    root = tmp_path_factory.mktemp("tuned")
    tokenizer = root / "tokenizer.model"  # the run's own copy: a test may replace it
    shutil.copyfile(spm_model, tokenizer)
    arch = dataclasses.replace(PRESETS["nano"], vocab_size=400, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**sda.hf_config(arch, torch.float32))).save_pretrained(root / "base_hf")
    import_hf(root / "base_hf", root / "base")

    records = write_jsonl(root / "instructions.jsonl", [r for r, _, _ in RECORDS] * 8)
    preprocess_sft([records], str(root / "chat"), str(tokenizer), chat_template="llama2-chat", system_prompt=SYSTEM,
                   seq_length=128, truncation="truncate", workers=1, progress=False)
    blend = [{"name": "chat", "weight": 1, "train": [str(root / "chat_sft_document")]}]
    run_train(root / "run", [f"data.tokenizer={tokenizer}", f"data.blend={json.dumps(blend)}", *LORA,
                             f"checkpoint.init_from={root / 'base'}", "training.train_iters=2",
                             "training.seq_length=128",
                             "checkpoint.save_interval=1", "logging.eval_iters=0"])
    write_demo_records(root / "mibe", records_per_task=2)
    return {"root": root, "tokenizer": tokenizer, "base": root / "base", "run": root / "run", "mibe": root / "mibe",
            "template": read_marker(root / "chat_sft_document")["template"]}


def first_sample(out: Path) -> dict:
    return json.loads((out / "samples_pubmedqa.jsonl").read_text().splitlines()[0])


def test_a_lora_run_is_scored_in_its_tuning_format_with_its_adapters(tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from melama_mcore.checkpoint.convert import export_hf, export_peft
    from melama_mcore.data.sft.templates import jinja_sha256

    template = tuned["template"]
    steps = sorted((tuned["run"] / "checkpoints").glob("iter_*"))
    assert [s.name for s in steps] == ["iter_0000001", "iter_0000002"]
    for step in steps:  # every checkpoint keeps the template its data was rendered with
        assert yaml.safe_load((step / "config.yaml").read_text())["data"]["chat_template"] == template

    # The README's stage-3 command on the run folder.
    out = tmp_path / "eval"
    code, log = eval_cli("--model", tuned["run"], "--tasks", "pubmedqa", "--data-dir", tuned["mibe"], "--out", out,
                         "--limit", "1", "--log-samples")
    assert code == 0, log[-3000:]
    sample = first_sample(out)
    query = sample["doc"]["query"]
    assert sample["prompt"] == f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{query.strip()} [/INST]"  # Meta's format
    origin = f"data.chat_template in {steps[-1] / 'config.yaml'}, exported with the model"
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["template"] == {"name": "llama2-chat", "source": origin, "sha256": jinja_sha256(template["jinja"]),
                                    "system_prompt": SYSTEM}
    assert f"MIBE prompts: chat template llama2-chat, with the default system prompt it carries ({origin}" in log
    assert (f"- prompts: chat template llama2-chat, with a default system prompt ({origin}; sha256 "
            f"{jinja_sha256(template['jinja'])})") in (out / "results.md").read_text()
    assert f"LoRA run {steps[-1]}: exporting its base {tuned['base']}" in log
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "samples_pubmedqa.jsonl"]

    # The exports a user makes carry the template where transformers reads it; peft on the exported
    # base and adapter generates what the evaluation logged, and the adapters change it.
    base_hf, adapter, merged = tmp_path / "base_hf", tmp_path / "adapter", tmp_path / "merged"
    export_hf(tuned["base"], base_hf, tokenizer=tuned["tokenizer"])
    export_peft(tuned["run"], adapter)
    export_hf(tuned["run"], merged, merge_lora=True)
    assert AutoTokenizer.from_pretrained(base_hf).chat_template is None  # the base was not tuned
    for folder in (adapter, merged):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == template["jinja"]
        assert tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                       add_generation_prompt=True) == sample["prompt"]
    ids = torch.tensor([tok(sample["prompt"], add_special_tokens=False).input_ids])
    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        model = PeftModel.from_pretrained(base, adapter)
        assert relative_error(model(ids).logits, plain) > 1e-3  # the adapters change the model
        generated = model.generate(ids, max_new_tokens=256, do_sample=False)[0, ids.shape[1]:]
    assert sample["generation"] == tok.decode(generated, skip_special_tokens=True)


def test_me_llama_and_a_jinja_file_travel_the_same_way(tuned, tmp_path):
    from transformers import AutoTokenizer

    from melama_mcore.checkpoint.convert import export_hf
    from melama_mcore.data.sft.templates import ME_LLAMA_JINJA, jinja_sha256

    me_llama = marker_template(tmp_path, "me_llama", str(tuned["tokenizer"]))
    assert me_llama == {"name": "me-llama", "jinja": ME_LLAMA_JINJA, "system_prompt": None}
    # A checkpoint holding the whole model (exported whole, the template into the model folder).
    whole = with_template(tuned["base"], tmp_path / "whole", me_llama, tokenizer=str(tuned["tokenizer"]))
    code, log = eval_cli("--model", whole, "--tasks", "pubmedqa", "--data-dir", tuned["mibe"], "--out",
                         tmp_path / "me_llama_eval", "--limit", "1", "--log-samples")
    assert code == 0, log[-3000:]
    sample = first_sample(tmp_path / "me_llama_eval")
    assert sample["prompt"] == f"<s>Human: \n{sample['doc']['query']}\n\nAssistant: \n"
    protocol = json.loads((tmp_path / "me_llama_eval" / "results.json").read_text())["protocol"]
    assert protocol["template"] == {"name": "me-llama", "sha256": jinja_sha256(ME_LLAMA_JINJA), "source":
                                    f"data.chat_template in {whole / 'config.yaml'}, exported with the model"}
    export_hf(whole, tmp_path / "whole_hf")  # what a user exports of it: the template in its tokenizer files
    assert AutoTokenizer.from_pretrained(tmp_path / "whole_hf").chat_template == ME_LLAMA_JINJA

    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    chatml = marker_template(tmp_path, "chatml", str(tuned["tokenizer"]), chat_template=str(jinja))
    assert chatml == {"name": str(jinja), "jinja": CHATML, "system_prompt": None}
    run = with_template(tuned["run"], tmp_path / "chatml_run", chatml)
    code, log = eval_cli("--model", run, "--tasks", "pubmedqa", "--data-dir", tuned["mibe"], "--out",
                         tmp_path / "chatml_eval", "--limit", "1", "--log-samples")
    assert code == 0, log[-3000:]
    sample = first_sample(tmp_path / "chatml_eval")
    assert sample["prompt"] == f"<s><|im_start|>user\n{sample['doc']['query']}<|im_end|>\n<|im_start|>assistant\n"
    protocol = json.loads((tmp_path / "chatml_eval" / "results.json").read_text())["protocol"]
    assert (protocol["template"]["name"], protocol["template"]["sha256"]) == ("hf", jinja_sha256(CHATML))


def test_refusals(tuned, tmp_path, other_spm_model):
    common = ["--tasks", "pubmedqa", "--data-dir", tuned["mibe"], "--out", tmp_path / "out"]

    def refused(*args) -> str:
        code, stderr = eval_cli(*args, *common)
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert not (tmp_path / "out").exists()  # created for the run, removed with it
        return stderr.strip().splitlines()[-1]

    ckpt = tuned["run"] / "checkpoints" / "iter_0000002"
    mismatch = refused("--model", tuned["run"], "--tokenizer", other_spm_model)
    assert mismatch.startswith(f"error: --tokenizer {other_spm_model} (400 tokens, another vocabulary) is not the "
                               f"tokenizer {ckpt} was trained with, {tuned['tokenizer']} (400 tokens): token ids "
                               "would mean other text"), mismatch
    assert mismatch.endswith("or pass --allow-tokenizer-mismatch if you mean it")
    # the run's own tokenizer file replaced by another vocabulary of the same size
    moved = with_template(tuned["run"], tmp_path / "moved", tuned["template"], tokenizer=other_spm_model)
    assert "(400 tokens, another vocabulary) is not the tokenizer" in refused("--model", moved)
    assert refused("--model", tuned["run"], "--adapter", tmp_path) == (
        f"error: --model {tuned['run']} is a LoRA run, which carries its adapters; --adapter applies other ones: "
        "evaluate one or the other")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_evaluation_leaves_nothing_in_out(tuned, tmp_path, monkeypatch, stop, other_spm_model):
    """A real signal, sent once the temporary export (base and adapters) is written: the run ends as
    interrupted, and neither the export nor the --out it created is left. (With a tokenizer of another
    vocabulary, allowed: the override lets the run reach its export.)"""
    from melama_mcore.checkpoint import opened
    from melama_mcore.eval import backends

    out = tmp_path / "out"
    seen = []

    def load_model(*args, **kwargs):
        seen.extend(sorted(p.relative_to(out).parts[1] for p in out.glob(".hf-export-*/*")))
        os.kill(os.getpid(), stop)
        raise AssertionError("the signal did not stop the run")

    def not_handled(signum, frame):
        raise AssertionError("melama eval did not handle SIGTERM")

    monkeypatch.setattr(backends, "load_model", load_model)
    opened._warn_once.cache_clear()  # printed once per process: this test's run must print it
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        code, stderr = eval_cli("--model", tuned["run"], "--tasks", "pubmedqa", "--data-dir", tuned["mibe"],
                                "--out", out, "--tokenizer", other_spm_model, "--allow-tokenizer-mismatch")
    finally:
        assert signal.signal(signal.SIGTERM, previous) is not_handled  # restored after the run
    assert seen == ["adapter", "model"]
    assert code == 130 and stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert stderr.count("using it anyway (--allow-tokenizer-mismatch)") == 1
    assert not out.exists()
