"""`melama eval` end to end on a tiny random LLaMA: a megatron checkpoint saved at TP 2 x PP 2 gives
the same prompts, generations and scores as evaluating its Hugging Face export, and the same
generations as transformers' own greedy `generate` on prompts built here from the records; both
extractors in every run, the released record selection for --limit, the counts (prompts cut,
generations stopped by the budget) against transformers' token counts, and `melama eval rescore`
reproducing results.json from the samples files. A PEFT adapter on a model folder that carries a chat
template gives what peft's model generates on that template's training prompt, cut to the context."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_fixtures import LLAMA2_JINJA_PLAIN
from test_eval_metrics import tiny_bert  # noqa: F401  (a fixture)
from test_eval_tasks import fisher_yates

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


def greedy(hf_dir: Path, prompts: list[str], adapter: Path | None = None, room: int | None = None,
           new_tokens: int = 256) -> list[dict]:
    """transformers' (and peft's) greedy generation on each prompt's tokens (its BOS written as text, or
    added by the tokenizer), cut to the last `room`: the continuation decoded, the tokens cut, whether
    it ran to `new_tokens` tokens without end-of-sequence, the tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=not prompt.startswith(tokenizer.bos_token)).input_ids
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        cut = max(0, len(ids) - room) if room else 0
        with torch.no_grad():
            out = model.generate(torch.tensor([ids[cut:]]), max_new_tokens=new_tokens, do_sample=False)
        new = out[0, len(ids) - cut:].tolist()
        outputs.append({"generation": tokenizer.decode(new, skip_special_tokens=True), "cut": cut, "tokens": new,
                        "hit": len(new) == new_tokens and tokenizer.eos_token_id not in new})
    return outputs


def test_megatron_checkpoint_matches_its_export_and_transformers(world, tmp_path, monkeypatch):
    from melama_mcore.checkpoint.convert import export_hf
    from melama_mcore.cli import run_main
    from melama_mcore.eval.command import EvalOptions, evaluate, main
    from melama_mcore.eval.scoring import COUNTS

    # 1. The user's command on the TP2 x PP2 checkpoint (exported on the fly): the paper's protocol by default.
    out_ckpt = tmp_path / "from_checkpoint"
    args = ["--model", world["ckpt"], "--tasks", ",".join(TASKS), "--data-dir", world["data"], "--out", out_ckpt,
            "--limit", "1", "--log-samples", "--chat"]
    result = subprocess.run([sys.executable, "-m", "melama_mcore.cli", "eval", *map(str, args)],
                            env={**ENV, "MELAMA_BERTSCORE_MODEL": str(world["bert"])}, timeout=600,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "| QA | PubMedQA |" in result.stdout and "records/s" in result.stdout
    assert "MIBE prompts: chat template me-llama (--chat, and the model carries no chat template" in result.stdout
    assert sorted(p.name for p in out_ckpt.iterdir()) == sorted(
        ["results.json", "results.md", *(f"samples_{t}.jsonl" for t in TASKS)])  # the export is gone
    compat = json.loads((out_ckpt / "results.json").read_text())
    assert compat["protocol"] == {
        "extractor": "mibe-compat", "template": compat["protocol"]["template"], "limit": 1,
        "selection": "the first 1 records after the released evaluator's seed-42 shuffle", "max_new_tokens": 256,
        "num_fewshot": None, "backend": "hf", "model": str(world["ckpt"]), "adapter": None,
        "data_dir": str(world["data"]), "bertscore": {"model": None, "path": str(world["bert"]), "layer": 2,
                                                      "identified_by": "unidentified: its last layer"},
        "lm_eval": compat["protocol"]["lm_eval"]}
    assert compat["protocol"]["template"]["name"] == "me-llama"
    from melama_mcore.eval.tasks import TASKS as MIBE  # the paper's order

    assert list(compat) == ["protocol", *(t for t in MIBE if t in TASKS)]
    assert list(compat["pubmedqa"])[:3] == ["accuracy", "macro_f1", "missing_rate"]

    # 2. Rescored from its samples files alone: the same results.json (the protocol says it was rescored);
    # rescored under strict: the two extractors' numbers swap places, the counts stay.
    monkeypatch.setenv("MELAMA_BERTSCORE_MODEL", str(world["bert"]))
    assert run_main(main, ["rescore", str(out_ckpt), "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert rescored == {**compat, "protocol": {**compat["protocol"], "rescored_from": str(out_ckpt)}}
    assert run_main(main, ["rescore", str(out_ckpt), "--out", str(tmp_path / "strict"), "--extractor", "strict"]) == 0
    strict = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert strict["protocol"]["extractor"] == "strict"
    for task in TASKS:
        assert set(strict[task]) == {m.replace("@strict", "") if "@" in m else m if m in (*COUNTS, "extractor_disagreement")
                                     else f"{m}@mibe-compat" for m in compat[task]}
        for metric, value in compat[task].items():
            name, _, other = metric.partition("@")
            same = metric in (*COUNTS, "extractor_disagreement")  # properties of the run, not of an extractor
            assert strict[task][metric if same else f"{name}@mibe-compat" if not other else name] == value, metric

    # 3. Its Hugging Face export, evaluated the same way: the same records, prompts, generations, scores.
    export = tmp_path / "export"
    export_hf(world["ckpt"], export)  # carries the tokenizer the checkpoint's config.yaml names
    out_hf = tmp_path / "from_export"
    table = evaluate(EvalOptions(model=export, tasks=TASKS, out=out_hf, data_dir=world["data"], limit=1,
                                 log_samples=True, chat=True))
    assert {k: v for k, v in compat.items() if k != "protocol"} == table
    assert json.loads((out_hf / "results.json").read_text()) == {**compat, "protocol": {
        **compat["protocol"], "model": str(export)}}
    for task in TASKS:
        assert samples(out_ckpt, task) == samples(out_hf, task)

    # 4. transformers on the original model, with prompts built here from the records the released
    # shuffle takes first (of two), in Me-LLaMA's wrapper after the BOS.
    logged = [samples(out_ckpt, t)[0] for t in TASKS]
    first = fisher_yates([0, 1], 42)[0]
    records = {t: json.loads((world["data"] / f"{t}.jsonl").read_text().splitlines()[first]) for t in TASKS}
    assert [s["doc_id"] for s in logged] == [first] * len(TASKS) and [s["doc"] for s in logged] == list(records.values())
    prompts = [f"<s>Human: \n{records[t]['query']}\n\nAssistant: \n" for t in TASKS]
    assert [s["prompt"] for s in logged] == prompts
    reference = greedy(world["hf"], prompts)
    assert [s["generation"] for s in logged] == [r["generation"] for r in reference]
    assert all(r["generation"].strip() for r in reference) and len({r["generation"] for r in reference}) == len(TASKS)
    for task, sample, ref in zip(TASKS, logged, reference):
        assert (sample["prompt_tokens_cut"], sample["hit_max_new_tokens"]) == (0, ref["hit"])
        assert (compat[task]["truncated_prompts"], compat[task]["hit_max_new_tokens"]) == (0, int(ref["hit"]))
        assert compat[task]["empty_generations"] == 0 and compat[task]["records"] == 1


def test_peft_adapter_and_the_models_chat_template(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from melama_mcore.data.sft.conversations import Conversation
    from melama_mcore.data.sft.templates import load_template
    from melama_mcore.data.tokenizer import load_tokenizer
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
    # The base as a tuned run's export would carry it: its chat template in the tokenizer files, and
    # here a 300-token context, so the prompt (context minus 256 new tokens: 44 tokens) is cut.
    tuned = tmp_path / "tuned"
    shutil.copytree(world["hf"], tuned)
    (tuned / "chat_template.jinja").write_text(LLAMA2_JINJA_PLAIN)
    config = json.loads((tuned / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 300}))

    out = tmp_path / "out"
    table = evaluate(EvalOptions(model=tuned, adapter=adapter, tasks=["pubmedqa"], out=out, data_dir=world["data"],
                                 limit=1, log_samples=True))
    logged = samples(out, "pubmedqa")[0]
    query = logged["doc"]["query"]
    text, spans = load_template("hf", load_tokenizer(str(tuned))).render(Conversation([(query, "yes")]))
    assert logged["prompt"] == text[:spans[0][0]] == "<s>[INST] " + query.strip() + " [/INST]"
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["template"]["name"] == "hf"
    assert protocol["template"]["source"] == f"the model's {tuned / 'chat_template.jinja'}"
    with_adapter, = greedy(tuned, [logged["prompt"]], adapter, room=300 - 256)
    without, = greedy(tuned, [logged["prompt"]], room=300 - 256)
    assert logged["generation"] == with_adapter["generation"] != without["generation"]
    assert with_adapter["cut"] > 0 and logged["prompt_tokens_cut"] == with_adapter["cut"]
    assert logged["hit_max_new_tokens"] == with_adapter["hit"]
    assert table["pubmedqa"]["truncated_prompts"] == 1 and table["pubmedqa"]["max_prompt_tokens_cut"] == with_adapter["cut"]
    assert table["pubmedqa"]["hit_max_new_tokens"] == int(with_adapter["hit"])


def test_counts_of_a_generation_that_ends(world, tmp_path, monkeypatch):
    """A model made to end one record's generation early (end-of-sequence wherever a token that only
    that record generates wins): it is not counted as stopped by the budget (8 tokens here), the other
    record is. Both records in one batch: prompts of different lengths, left-padded (as on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from melama_mcore.eval import command
    from melama_mcore.eval.command import EvalOptions, evaluate

    def batched(*args, **kwargs):
        model_args, run_args = model_arguments(*args, **kwargs)
        return model_args, {**run_args, "batch_size": 2}

    model_arguments = command.model_arguments
    monkeypatch.setattr(command, "model_arguments", batched)

    records = [json.loads(line) for line in (world["data"] / "pubmedqa.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in greedy(world["hf"], [r["query"] for r in records], new_tokens=8)]
    ends, trigger = next((i, t) for i in (0, 1) for t in tokens[i] if t not in tokens[1 - i])
    model = AutoModelForCausalLM.from_pretrained(world["hf"], dtype=torch.float32)
    eos = AutoTokenizer.from_pretrained(world["hf"]).eos_token_id
    with torch.no_grad():  # the same logit as the trigger: end-of-sequence (the lower id) wins their ties
        model.lm_head.weight[eos] = model.lm_head.weight[trigger]
    ending = tmp_path / "ending"
    model.save_pretrained(ending)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(world["hf"] / name, ending / name)
    out = tmp_path / "out"
    table = evaluate(EvalOptions(model=ending, tasks=["pubmedqa"], out=out, data_dir=world["data"], log_samples=True,
                                 max_new_tokens=8))
    logged = samples(out, "pubmedqa")
    reference = greedy(ending, [r["query"] for r in records], new_tokens=8)
    assert [s["generation"] for s in logged] == [r["generation"] for r in reference]
    assert [s["hit_max_new_tokens"] for s in logged] == [r["hit"] for r in reference] == [i != ends for i in (0, 1)]
    assert table["pubmedqa"]["hit_max_new_tokens"] == 1 and table["pubmedqa"]["truncated_prompts"] == 0
    ids = AutoTokenizer.from_pretrained(ending)([r["query"] for r in records]).input_ids
    assert len(ids[0]) != len(ids[1])  # so the shorter prompt was padded


def test_checkpoint_without_a_tokenizer(world, tmp_path):
    from melama_mcore.cli import run_main
    from melama_mcore.checkpoint.convert import import_hf
    from melama_mcore.eval.command import main

    hf = tmp_path / "hf"  # the folder without its tokenizer files: the import records none
    shutil.copytree(world["hf"], hf, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    ckpt = tmp_path / "imported"
    import_hf(hf, ckpt, 1, 1, None, 128)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(main, ["--model", str(ckpt), "--tasks", "pubmedqa", "--data-dir", str(world["data"]),
                               "--out", str(tmp_path / "out")])
    assert code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        f"error: {ckpt}: its config.yaml names no tokenizer (data.tokenizer; an import of a Hugging Face folder "
        "without tokenizer.model has none): "
        "pass --tokenizer TOKENIZER, the one its weights were trained with")
    assert not (tmp_path / "out").exists()
