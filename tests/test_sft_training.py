"""Instruction tuning through the trainer: packed conversations and LoRA adapters, at every layout,
against a single-process run; resume and resharding of adapter checkpoints; `melama eval-ppl`
against the trainer's own validation.

The data is the project's synthetic instruction set run through `melama preprocess-sft` (Me-LLaMA's
template, loss on answers only), packed several conversations per sequence. Every run starts from
one seed checkpoint (the base model), so runs differ only in how megatron splits the work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from melama_mcore.demo.instructions import write_synthetic_instructions
from trunk_fixtures import data_overrides, eval_losses, losses, run_train, step_records

pytestmark = pytest.mark.slow

LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0",
        "peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer]", "optimizer.lr=1e-2"]
REGIME = ["model.num_layers=8", "training.seq_length=64", "training.global_batch_size=16", "logging.eval_iters=1"]
TP2, SP, PP2, VP2 = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.pipeline_parallel=2",
                     "parallel.virtual_pipeline=2")


@pytest.fixture(scope="module")
def sft(tiny_data, tmp_path_factory):
    """The seed checkpoint (base), the instruction blend, and the overrides every run shares."""
    root = tmp_path_factory.mktemp("sft")
    files = write_synthetic_instructions(root / "instructions", samples=300, seed=0)
    prefix = root / "data" / "instructions"
    subprocess.run([sys.executable, "-m", "melama_mcore.cli", "preprocess-sft", "--input", *map(str, files.values()),
                    "--output-prefix", str(prefix), "--tokenizer-model", tiny_data["tokenizer"], "--seq-length", "64",
                    "--truncation", "truncate", "--workers", "1", "--no-progress"], check=True, capture_output=True)
    blend = [{"name": "instructions", "weight": 1, "train": [f"{prefix}_sft_document"]}]
    seed = root / "base"
    run_train(root / "init", data_overrides(tiny_data) + REGIME + [f"--create-seed-checkpoint={seed}"])
    common = [f"data.tokenizer={tiny_data['tokenizer']}", f"data.blend={json.dumps(blend)}", *REGIME,
              f"checkpoint.init_from={seed}"]
    return {"root": root, "common": common, "blend": blend, "base": seed}


def _reference(sft, name: str, extra: list[str]) -> dict:
    out = sft["root"] / name
    if not (out / "metrics.jsonl").exists():
        result = run_train(out, sft["common"] + extra)
        assert "packing" in result.stdout  # the packed path ran, and says how full its sequences are
    ref = {"losses": losses(out), "eval": eval_losses(out), "dir": out}
    assert sorted(ref["losses"]) == [1, 2, 3] and ref["losses"][3] < ref["losses"][1]
    return ref


def _assert_same(got_dir, ref: dict, what: str) -> None:
    got = losses(got_dir)
    for step, expected in ref["losses"].items():
        assert got[step] == pytest.approx(expected, rel=1e-5), f"{what}: loss of step {step}"
    for source, expected in ref["eval"].items():
        assert eval_losses(got_dir)[source] == pytest.approx(expected, rel=1e-5), f"{what}: validation"


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2", "dp2"])
def test_lora_layout_equals_the_single_process_run(layout, sft, tmp_path):
    ref = _reference(sft, "lora_ref", LORA)
    nproc, extra = {"tp2": (2, [TP2]), "tp2_sp": (2, [TP2, SP]), "pp2": (2, [PP2]), "dp2": (2, [])}[layout]
    run_train(tmp_path / layout, sft["common"] + LORA + extra, nproc=nproc)
    _assert_same(tmp_path / layout, ref, f"lora {layout}")


def test_full_fine_tuning_with_interleaved_pipeline_equals_the_single_process_run(sft, tmp_path):
    """PP 2 x VP 2: a rank's first chunk is a middle stage, which must read the packed boundaries too."""
    ref = _reference(sft, "full_ref", [])
    run_train(tmp_path / "run", sft["common"] + [PP2, VP2], nproc=2)
    _assert_same(tmp_path / "run", ref, "full fine-tuning pp2 x vp2")


def test_lora_trains_adapters_only_and_its_checkpoint_resumes_at_another_layout(sft, tmp_path):
    """Stopped at step 2 at TP 2, resumed at TP 1: the curve of the uninterrupted single-process
    run. The checkpoint holds the adapters only (and says whose), the log counts the trainable
    parameters (the adapters, derived here by hand), and the base weights never change."""
    ref = _reference(sft, "lora_ref", LORA)
    out = tmp_path / "run"
    first = run_train(out, sft["common"] + LORA + [TP2, "training.stop_after_step=2"], nproc=2)
    h, f, v, layers, rank = 64, 176, 512, 8, 4  # nano: hidden 64, 4 heads of 16, 2 KV groups, FFN 176
    kv = 2 * 16
    per_layer = rank * ((h + h) + (h + kv) * 2 + (h + h) + (h + f) * 2 + (f + h))  # q,k,v; o; gate,up; down
    expected = layers * per_layer + rank * (h + v)  # + lm_head (vocabulary as the tokenizer has it, unpadded)
    assert f"trainable parameters: {expected:,} (LoRA adapters)" in first.stdout
    run_train(out, sft["common"] + LORA)
    got = losses(out)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref["losses"][step], rel=1e-5), f"step {step}"
    ckpt = out / "checkpoints" / "iter_0000003"
    identity = json.loads((ckpt / "model_identity.json").read_text())
    assert identity["peft"]["rank"] == 4 and identity["peft"]["base"] == str(sft["base"])

    script = textwrap.dedent(f"""
        import json
        from torch.distributed.checkpoint import FileSystemReader
        print(json.dumps(list(FileSystemReader({str(ckpt)!r}).read_metadata().state_dict_metadata)))
    """)
    keys = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    weights = [k for k in keys if not k.startswith("optimizer") and k.endswith(("weight", "lora_A", "lora_B"))]
    assert weights and all(".lora." in k for k in weights), [k for k in weights if ".lora." not in k][:3]


def test_the_trainer_counts_the_flops_lora_executes(sft):
    """The trainer's TFLOP/s (and so its MFU) of a LoRA run count LoRA's FLOPs per token, as the
    benchmark and the planner do (test_mfu.py): full training's Megatron count minus the weight
    gradients of the frozen linears (2 FLOPs per weight and token), plus 6 per adapter parameter."""
    from melama_mcore.models.llama.config_registry import PRESETS, flops_per_token

    ref = _reference(sft, "lora_ref", LORA)
    arch = dataclasses.replace(PRESETS["nano"], num_layers=8, vocab_size=512)
    h, f, kv, layers, rank, padded, seq = 64, 176, 32, 8, 4, 512, 64  # 512 tokens: no padding at TP 1
    linear_weights = layers * (h * (h + 2 * kv) + h * h + 3 * h * f) + padded * h
    adapters = layers * rank * ((h + h) + (h + kv) * 2 + (h + h) + (h + f) * 2 + (f + h)) + rank * (h + padded)
    lora_flops = flops_per_token(arch, seq, padded) - 2 * linear_weights + 6 * adapters
    for record in step_records(ref["dir"]):  # one process: tokens/s per GPU is tokens/s
        assert record["tflops_per_gpu"] * 1e12 / record["tokens_per_s"] == pytest.approx(lora_flops, rel=1e-9)


def test_eval_ppl_equals_the_runs_own_validation_at_another_layout(sft, tiny_data, tmp_path):
    """`melama eval-ppl` of an adapter run's checkpoint (its base loaded first), at TP 2, gives the
    validation losses the single-process run logged at that step."""
    ref = _reference(sft, "lora_ref", LORA)
    blend_file = tmp_path / "blend.yaml"
    blend_file.write_text(json.dumps({"sources": sft["blend"]}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _port(),
           "-m", "melama_mcore.eval.perplexity", "--model", str(ref["dir"]), "--blend", str(blend_file),
           "--out", str(tmp_path / "ppl"), "--tp", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    for source, expected in ref["eval"].items():
        assert report["sources"][source]["loss"] == pytest.approx(expected, rel=1e-5)
        assert report["sources"][source]["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def _port() -> str:
    from melama_mcore.distributed.launch import free_local_port

    return str(free_local_port())
