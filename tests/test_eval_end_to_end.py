"""`melama eval` end to end on a tiny random LLaMA: a megatron checkpoint saved at TP 2 x PP 2 gives
the same prompts, generations and scores as evaluating its Hugging Face export, and the same
generations as transformers' own greedy `generate` on prompts built here from the records; a PEFT
adapter gives what peft's model generates."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_eval_metrics import tiny_bert  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

TASKS = ["pubmedqa", "mednli", "i2b2", "pubmedsum"]  # one of each kind the demo writes
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict:  # noqa: F811
    """A sentencepiece tokenizer, a random HF LLaMA with it, that model imported as a megatron checkpoint
    at TP 2 x PP 2 whose config names the tokenizer (as a training run's does), and MIBE-shaped records."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.checkpoint.hf_folder import copy_tokenizer
    from melama_mcore.checkpoint.convert import import_hf
    from melama_mcore.demo.corpus import write_demo_corpus
    from melama_mcore.config.job_config import dump_config, load_config
    from melama_mcore.data.train_tokenizer import train_sentencepiece
    from melama_mcore.demo.mibe import write_demo_records

    root = tmp_path_factory.mktemp("eval_e2e")
    corpus = write_demo_corpus(root / "corpus", docs_per_source=60, seed=0)
    tokenizer = train_sentencepiece([str(p) for p in corpus.values()], str(root / "tok" / "spm"), vocab_size=400)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    # A shape no preset has; the export carries its 4096-token context.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=pieces.vocab_size(), hidden_size=48, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for i in range(pieces.vocab_size()):  # never emit byte or unknown pieces: readable generations
            if pieces.is_byte(i) or pieces.is_unknown(i):
                model.lm_head.weight[i] = 0
    hf = root / "hf"
    model.save_pretrained(hf)
    copy_tokenizer(tokenizer, hf)
    ckpt = root / "ckpt"
    import_hf(hf, ckpt, 2, 2, None, 128)
    cfg = load_config(ckpt / "config.yaml")
    cfg.data.tokenizer = str(tokenizer)
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    write_demo_records(root / "data", records_per_task=2)
    return {"root": root, "tokenizer": tokenizer, "hf": hf, "ckpt": ckpt, "data": root / "data", "bert": tiny_bert}


def samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def greedy(hf_dir: Path, prompts: list[str], adapter: Path | None = None) -> list[str]:
    """transformers' (and peft's) greedy generation, 256 new tokens, the continuation decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=256, do_sample=False)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def test_megatron_checkpoint_matches_its_export_and_transformers(world, tmp_path, monkeypatch):
    from melama_mcore.checkpoint.convert import export_hf
    from melama_mcore.eval.command import EvalOptions, evaluate

    # 1. The user's command on the TP2 x PP2 checkpoint (exported on the fly).
    out_ckpt = tmp_path / "from_checkpoint"
    args = ["--model", world["ckpt"], "--tasks", ",".join(TASKS), "--data-dir", world["data"], "--out", out_ckpt,
            "--limit", "1", "--log-samples", "--chat"]
    result = subprocess.run([sys.executable, "-m", "melama_mcore.cli", "eval", *map(str, args)],
                            env={**ENV, "MELAMA_BERTSCORE_MODEL": str(world["bert"])}, timeout=600,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "| QA | PubMedQA |" in result.stdout and "records/s" in result.stdout
    assert sorted(p.name for p in out_ckpt.iterdir()) == sorted(
        ["results.json", "results.md", *(f"samples_{t}.jsonl" for t in TASKS)])  # the export is gone

    # 2. Its Hugging Face export, evaluated the same way.
    export = tmp_path / "export"
    export_hf(world["ckpt"], export)  # carries the tokenizer the checkpoint's config.yaml names
    out_hf = tmp_path / "from_export"
    monkeypatch.setenv("MELAMA_BERTSCORE_MODEL", str(world["bert"]))
    table = evaluate(EvalOptions(model=export, tasks=TASKS, out=out_hf, data_dir=world["data"], limit=1,
                                 log_samples=True, chat=True))

    scores = json.loads((out_ckpt / "results.json").read_text())
    assert scores == table == json.loads((out_hf / "results.json").read_text())
    assert set(scores) == set(TASKS) and scores["pubmedsum"]["bertscore_f1"] is not None
    assert list(scores["pubmedqa"]) == ["accuracy", "macro_f1", "missing_rate"]
    for task in TASKS:
        assert samples(out_ckpt, task) == samples(out_hf, task)

    # 3. transformers on the original model, with prompts built here from the records.
    records = {t: json.loads((world["data"] / f"{t}.jsonl").read_text().splitlines()[0]) for t in TASKS}
    prompts = [f"Human: \n{records[t]['query']}\n\nAssistant: \n" for t in TASKS]
    logged = [samples(out_ckpt, t)[0] for t in TASKS]
    assert [s["prompt"] for s in logged] == prompts
    generations = [s["generation"] for s in logged]
    assert generations == greedy(world["hf"], prompts)
    assert all(g.strip() for g in generations) and len(set(generations)) == len(TASKS)


def test_peft_adapter(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from melama_mcore.eval.command import EvalOptions, evaluate

    base = AutoModelForCausalLM.from_pretrained(world["hf"], dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # initialised to zero: make the adapter change the model
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)

    out = tmp_path / "out"
    evaluate(EvalOptions(model=world["hf"], adapter=adapter, tasks=["pubmedqa"], out=out, data_dir=world["data"],
                         limit=1, log_samples=True))  # chat prompts: the default with an adapter
    logged = samples(out, "pubmedqa")[0]
    assert logged["prompt"].startswith("Human: \n")
    with_adapter, = greedy(world["hf"], [logged["prompt"]], adapter)
    without, = greedy(world["hf"], [logged["prompt"]])
    assert logged["generation"] == with_adapter != without


def test_checkpoint_without_a_tokenizer(world, tmp_path):
    from melama_mcore.cli import run_main
    from melama_mcore.checkpoint.convert import import_hf
    from melama_mcore.eval.command import main

    ckpt = tmp_path / "imported"
    import_hf(world["hf"], ckpt, 1, 1, None, 128)  # an import's config.yaml names no tokenizer
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(main, ["--model", str(ckpt), "--tasks", "pubmedqa", "--data-dir", str(world["data"]),
                               "--out", str(tmp_path / "out")])
    assert code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        f"error: {ckpt}: its config.yaml names no tokenizer (data.tokenizer; a weights-only import has none): "
        f"export it with `melama convert export-hf --ckpt {ckpt} --tokenizer TOKENIZER --out DIR` and use DIR")
    assert not (tmp_path / "out" / "results.json").exists()
