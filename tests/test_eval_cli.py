"""`melama eval` refusals: each user mistake ends in one `error:` line and exit code 2, before any
model is loaded and without results.json; the lm-eval model arguments each backend gets; results.md;
and `melama eval rescore` on samples files written by hand (no model)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from melama_mcore.eval.command import EvalOptions, main, model_arguments
from melama_mcore.demo.mibe import write_demo_records

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=400, hidden_size=48,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096)


def run(*args) -> tuple[int, str]:
    from melama_mcore.cli import run_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(main, [str(a) for a in args])
    return code, err.getvalue()


def refused(args, out: Path, *phrases: str) -> str:
    code, stderr = run(*args, "--out", out)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert code == 2, stderr
    assert last.startswith("error: ") and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in last, last
    assert not (out / "results.json").exists()
    return last


@pytest.fixture()
def setup(tmp_path) -> dict:
    """A Hugging Face folder that is never loaded (these runs stop before; its weight file is whole, but
    not the model's) and demo records."""
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / "tokenizer.model").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, model / "model.safetensors")
    data = tmp_path / "data"
    write_demo_records(data, records_per_task=2)
    return {"model": model, "data": data, "out": tmp_path / "out"}


def test_help():
    for argv, phrases in ((["--help"], ["--extractor {strict,mibe-compat}", "--chat-template NAME|FILE",
                                        "melama eval rescore RUN_DIR --out DIR"]),
                          (["rescore", "--help"], ["usage: melama eval rescore [-h] --out OUT", "RUN_DIR"])):
        with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(io.StringIO()) as out:
            main(argv)
        assert info.value.code == 0
        text = " ".join(out.getvalue().split())
        assert all(" ".join(p.split()) in text for p in phrases), text


def test_data_errors(setup, tmp_path):
    model, out = setup["model"], setup["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["--model", model, "--tasks", "pubmedqa", "--data-dir", empty], out,
            f"{empty / 'pubmedqa.jsonl'} not found")
    (setup["data"] / "mednli.jsonl").write_text('{"query": "q", "choices": ["a", "b"]}\n')
    refused(["--model", model, "--tasks", "pubmedqa,mednli", "--data-dir", setup["data"]], out,
            f"{setup['data'] / 'mednli.jsonl'}:1: no field 'gold'")
    refused(["--model", model, "--tasks", "pubmedqa", "--data-dir", setup["data"], "--num-fewshot", "5"], out,
            "--num-fewshot 5: pubmedqa has 3 training examples")


def test_model_and_output_errors(setup, tmp_path):
    common = ["--tasks", "pubmedqa", "--data-dir", setup["data"]]
    refused(["--model", tmp_path / "nowhere", *common], setup["out"], "does not exist")
    (setup["model"] / "tokenizer.model").unlink()
    refused(["--model", setup["model"], *common], setup["out"], "no tokenizer")
    plain = tmp_path / "plain"
    plain.mkdir()
    refused(["--model", plain, *common], setup["out"], "is not a checkpoint")
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text("{}")
    code, stderr = run("--model", setup["model"], *common, "--out", done)
    assert code == 2 and "already holds results.json" in stderr and (done / "results.json").read_text() == "{}"


def test_outputs_checked_first_and_left_as_found(setup, tmp_path):
    """--out is checked before any work; a run refused after it created --out removes it again."""
    common = ["--model", setup["model"], "--tasks", "pubmedqa", "--data-dir", setup["data"]]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    refused(common, blocker / "results", f"--out {blocker / 'results'}: {blocker} is a file, not a folder")
    new = tmp_path / "new" / "out"
    refused([*common, "--chat-template", "llama-2"], new, "--chat-template 'llama-2': not one of")
    assert not (tmp_path / "new").exists()
    refused([*common, "--tokenizer", setup["model"] / "tokenizer.model"], new,
            f"--tokenizer applies to a megatron checkpoint; the Hugging Face folder {setup['model']} is read")


def test_damaged_model_folder(setup):
    """A truncated or missing weight file is named before lm-eval loads anything; a folder that lm-eval
    cannot load (here: its tokenizer file is empty) is named in one line too."""
    common = ["--tasks", "pubmedqa", "--data-dir", setup["data"]]
    model, weights = setup["model"], setup["model"] / "model.safetensors"
    refused(["--model", model, *common], setup["out"], f"--model {model}: lm-eval's hf backend cannot load it (")
    weights.write_bytes(weights.read_bytes()[:-2])
    refused(["--model", model, *common], setup["out"], f"{weights} is not a complete safetensors file",
            "Fetch it again")
    weights.unlink()
    shard = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    refused(["--model", model, *common], setup["out"], "lists shards that are missing: model-00001-of-00002.safetensors")


def test_small_context_and_vllm_missing(setup):
    common = ["--model", setup["model"], "--tasks", "pubmedqa", "--data-dir", setup["data"]]
    refused([*common, "--backend", "vllm"], setup["out"], "--backend vllm needs vLLM")
    refused([*common, "--chat-template", "llama-2"], setup["out"], "--chat-template 'llama-2': not one of")
    (setup["model"] / "config.json").write_text(json.dumps({**CONFIG, "max_position_embeddings": 256}))
    refused(common, setup["out"], "context (256 tokens", "256 new tokens")


def lora_adapter(folder: Path, hidden: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**config, "hidden_size": hidden}))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])).save_pretrained(folder)
    return folder


def test_adapter_errors(setup, tmp_path):
    common = ["--model", setup["model"], "--tasks", "pubmedqa", "--data-dir", setup["data"]]
    refused([*common, "--adapter", tmp_path], setup["out"], "no adapter_config.json")
    other = lora_adapter(tmp_path / "other", hidden=32)  # trained on a model with hidden size 32, not 48
    refused([*common, "--adapter", other], setup["out"], f"--adapter {other} does not fit the model",
            "down_proj of layer 0 has output size 48, the adapter's lora_B 32")
    # a config whose rank is not its weights' (edited by hand, or from another save): one line, not peft's
    # size-mismatch traceback per matrix
    wrong_rank = lora_adapter(tmp_path / "wrong_rank", hidden=48)
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    refused([*common, "--adapter", wrong_rank], setup["out"],
            f"--adapter {wrong_rank}: its adapter_config.json gives model.layers.0.mlp.down_proj rank 8 (r), but "
            "its lora_A has rank 4: the config and the weights are of different adapters")
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"v_proj": 2}}))
    refused([*common, "--adapter", wrong_rank], setup["out"], "gives model.layers.0.self_attn.v_proj rank 2 "
            "(rank_pattern 'v_proj'), but its lora_A has rank 4")
    deeper = tmp_path / "deeper"
    (setup["model"] / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 1}))
    refused([*common, "--adapter", lora_adapter(deeper, hidden=48)], setup["out"], "adapts layer 1",
            "the model has 1 layers")


def test_model_arguments(setup, tmp_path):
    hf = setup["model"]
    args, run_args = model_arguments("hf", hf, None, None, gpus=0)
    assert args == {"pretrained": str(hf), "dtype": "float32"} and run_args == {"batch_size": 1, "device": "cpu"}
    args, run_args = model_arguments("hf", hf, tmp_path, {"r": 4}, gpus=2)
    assert args == {"pretrained": str(hf), "dtype": "auto", "peft": str(tmp_path), "parallelize": True}
    assert run_args == {"batch_size": "auto", "device": "cuda"}
    # vLLM: tensor parallel over the GPUs, at most as many as divide the 4 attention heads
    args, run_args = model_arguments("vllm", hf, tmp_path, {"r": 12}, gpus=8)
    assert args == {"pretrained": str(hf), "dtype": "auto", "gpu_memory_utilization": 0.9, "tensor_parallel_size": 4,
                    "lora_local_path": str(tmp_path), "max_lora_rank": 16}
    assert model_arguments("vllm", hf, None, None, gpus=3)[0]["tensor_parallel_size"] == 2
    assert EvalOptions(model=hf, tasks=["mibe"], out=tmp_path).max_new_tokens == 256


@pytest.mark.slow  # looks the name up in lm-eval's whole task index (thousands of YAML files)
def test_unknown_task_name(setup):
    last = refused(["--model", setup["model"], "--tasks", "pubmedqa,pubmedq", "--data-dir", setup["data"]],
                   setup["out"], "unknown task 'pubmedq'", "did you mean pubmedqa")
    assert "MIBE tasks are mibe, pubmedqa, medqa" in last


def test_results_table_and_markdown():
    from melama_mcore.eval.report import collect, markdown

    lm_results = {"results": {
        "pubmedqa": {"alias": "pubmedqa", "accuracy,none": 0.5},  # MIBE: scored by scoring.task_result instead
        "mibe": {"alias": "mibe"},  # a group without metrics of its own
        "gsm8k": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.3},
        "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55}}}
    general = collect(lm_results)
    assert general == {"gsm8k": {"exact_match_strict-match": 0.2, "exact_match_flexible-extract": 0.3},
                       "arc_easy": {"accuracy": 0.6, "accuracy_norm": 0.55}}
    counts = {"records": 8, "truncated_prompts": 1, "max_prompt_tokens_cut": 12, "empty_generations": 0,
              "hit_max_new_tokens": 2, "extractor_disagreement": 0.25}
    table = {"pubmedqa": {"accuracy": 0.5, "macro_f1": 0.4, "missing_rate": 0.125, "accuracy@strict": 0.25,
                          "macro_f1@strict": 0.2, "missing_rate@strict": 0.5, **counts},
             "pubmedsum": {"rouge_1": 0.3, "rouge_2": 0.1, "rouge_l": 0.2, "bertscore_f1": None,
                           "rouge_1@strict": 0.3, "rouge_2@strict": 0.1, "rouge_l@strict": 0.2,
                           "bertscore_f1@strict": None, **counts},
             "i2b2": {"entity_f1": 0.5, "entity_precision": 0.4, "entity_recall": 2 / 3, "entity_f1.problem": 0.75,
                      "entity_f1@strict": 0.25, "entity_f1.test@strict": 0.125, **counts},
             **general}
    text = markdown(table, ["- model: `m`"], ["gsm8k", "arc_easy"], "mibe-compat")
    assert "## MIBE, mibe-compat extractor (this run's protocol)" in text
    assert "## MIBE, strict extractor (results.json: `<metric>@strict`)" in text
    columns = "accuracy | macro_f1 | entity_f1 | rouge_1 | rouge_2 | rouge_l | bertscore_f1 | missing_rate"
    assert text.count(f"| Task | Dataset | {columns} |") == 2
    assert "| QA | PubMedQA | 0.5000 | 0.4000 |  |  |  |  |  | 0.1250 |" in text
    assert "| QA | PubMedQA | 0.2500 | 0.2000 |  |  |  |  |  | 0.5000 |" in text
    assert "| summarisation | PubMed |  |  |  | 0.3000 | 0.1000 | 0.2000 | n/a |  |" in text
    assert "| PubMedQA | 8 | 1 | 12 | 0 | 2 | 0.2500 |" in text  # the counts
    assert "| 2010 i2b2 | problem | n/a | n/a | 0.7500 | n/a | n/a | n/a |" in text
    assert "| 2010 i2b2 | all | 0.4000 | 0.6667 | 0.5000 | n/a | n/a | n/a |" in text
    assert "## NER by entity type (strict)" in text and "| 2010 i2b2 | test | n/a | n/a | 0.1250 |" in text
    assert "| arc_easy | accuracy | 0.6000 |" in text and "| gsm8k | exact_match_strict-match | 0.2000 |" in text


# ---------------------------------------------------------------------------------------------
# melama eval rescore, from samples files alone
# ---------------------------------------------------------------------------------------------
def samples_file(folder: Path, task: str, lines: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"samples_{task}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_rescore_hand_written_samples(tmp_path):
    """Files written by hand in the samples form: `doc` (a record as in a task file) and `generation`."""
    run_dir = tmp_path / "run"
    question = {"query": "Does it help?\nANSWER:", "choices": ["yes", "no", "maybe"]}
    samples_file(run_dir, "pubmedqa", [{"doc": {**question, "gold": 0}, "generation": "Yes."},
                                   {"doc": {**question, "gold": 1}, "generation": "It is not clear."},
                                   {"doc": {**question, "gold": 2}, "generation": "maybe"}])
    samples_file(run_dir, "emrqa", [{"doc": {"query": "Where?", "answer": "left lobe"}, "generation": "Left lobe.\nmore"}])
    (run_dir / "samples_gsm8k.jsonl").write_text("not MIBE: ignored\n")
    code, stderr = run("rescore", run_dir, "--out", tmp_path / "out")
    assert code == 0, stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["protocol", "pubmedqa", "emrqa"]
    assert results["protocol"]["extractor"] == "mibe-compat" and results["protocol"]["rescored_from"] == str(run_dir)
    assert results["protocol"]["template"] == {"name": None, "source": "unknown (rescored from samples files alone)"}
    # mibe-compat: yes, no (inside "not"), maybe -> all right; strict: yes, missing, maybe -> 2/3
    assert results["pubmedqa"]["accuracy"] == 1.0 and results["pubmedqa"]["accuracy@strict"] == pytest.approx(2 / 3)
    assert results["pubmedqa"]["extractor_disagreement"] == pytest.approx(1 / 3)
    assert results["pubmedqa"]["truncated_prompts"] is None  # not recorded by hand: unknown
    # EmrQA, released rule: the whole output as characters, "leftlobemore" (12) vs "leftlobe" (8), 6 distinct
    # shared (l, e, f, t, o, b) -> P 6/12, R 6/8, F1 2 * 0.5 * 0.75 / 1.25 = 0.6; strict: the first line,
    # SQuAD-normalised "left lobe": exact match
    assert results["emrqa"]["token_f1"] == pytest.approx(0.6) and results["emrqa"]["exact_match@strict"] == 1.0


def test_rescore_refusals(tmp_path):
    code, stderr = run("rescore", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} has no samples_<task>.jsonl of a MIBE task: run `melama eval` with --log-samples")
    samples_file(tmp_path, "pubmedqa", [{"doc": {"query": "q", "choices": ["a", "b"], "gold": 5}, "generation": "a"}])
    code, stderr = run("rescore", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'samples_pubmedqa.jsonl'}:1 doc: field 'gold' must be an index into 'choices' (0..1) "
        "(pubmedqa)")
    samples_file(tmp_path, "pubmedqa", [{"doc": {"query": "q", "choices": ["a", "b"], "gold": 1}}])
    code, stderr = run("rescore", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and "samples_pubmedqa.jsonl:1: expected an object with 'doc'" in stderr
    assert not (tmp_path / "out" / "results.json").exists() and "Traceback" not in stderr
