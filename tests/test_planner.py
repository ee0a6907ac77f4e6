"""The planner against independent references: real megatron models built by the trunk (their
parameter, main-grad and Adam-state bytes per rank), the trunk's own layout checks, the LLaMA-2
parameter counts, and the Me-LLaMA 70B recipe."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from melama_mcore.commands import plan as planner
from melama_mcore.cli import run_main
from melama_mcore.config.job_config import PeftConfig, load_config
from melama_mcore.config.validate import Environment, resolve, validate
from melama_mcore.models.llama.config_registry import PRESETS, parameter_count
from melama_mcore.models.llama.config_registry import padded_vocab_size
from rank_launcher import run_ranks

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "throughput.py"
ME_LLAMA = ROOT / "examples" / "configs" / "llama2_70b_me_llama.yaml"
GPU_ENV = Environment(world_size=160, cuda=True, transformer_engine=False, fp8_capable=False)


@pytest.fixture(scope="module")
def plan_70b():
    return planner.plan(PRESETS["llama2-70b"], "llama2-70b", gpu="a100-80gb", gpus=160, seq=4096, gbs=1000)


def bench(tmp_path: Path, args: list[str], nproc: int) -> dict:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = run_ranks(nproc, str(BENCH), [*args, "--json", str(out)], env, timeout=300,
                       log_path=tmp_path / "bench.log", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    return json.loads(out.read_text())


# -- the memory model against real models ---------------------------------------------------------
def test_weights_grads_and_adam_state_equal_a_real_tp2_pp2_vp2_model(tmp_path):
    """4 CPU processes build nano with TP 2 x PP 2 x 2 virtual stages through the trunk, take one
    megatron optimizer step, and sum numel x element_size of parameters, main grads and Adam state
    per rank; the planner's per-stage bytes must equal them exactly (fp32 on CPU)."""
    report = bench(tmp_path, ["--preset", "nano", "--tp", "2", "--pp", "2", "--vp", "2", "--seq", "32",
                              "--mbs", "1", "--gbs", "4", "--warmup", "0", "--steps", "1",
                              "--vocab-size", "300", "--backends", "native"], nproc=4)
    arch = dataclasses.replace(PRESETS["nano"], vocab_size=300)
    layout = planner.Layout(tp=2, pp=2, vp=2, dp=1, mbs=1, recompute="none", distributed_optimizer=False)
    ranks = report["results"][0]["ranks"]
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        predicted = planner.stage_memory(arch, layout, 32, 4, "fp32", r["pp_rank"])
        assert predicted.params == r["params"]
        assert predicted.weights == r["param_bytes"]
        assert predicted.grads == r["main_grad_bytes"]
        assert predicted.optimizer == r["optimizer_state_bytes"]
    first, last = (next(r for r in ranks if r["pp_rank"] == s) for s in (0, 1))
    assert first["params"] != last["params"]  # embedding vs final norm + output layer: both stages checked


LORA_ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]


@pytest.mark.slow
def test_lora_weights_grads_and_adam_state_equal_a_real_tp2_model(tmp_path):
    """2 CPU processes build nano at TP 2 with LoRA on every target (output layer included: its
    vocabulary of 300 padded to 512 at TP 2), take one optimizer step, and sum the real tensors: the
    frozen base keeps its weights but has no main grads and no Adam state; the planner's bytes of
    the sharded adapters (A or B replicated, the other split like the base) must equal them."""
    report = bench(tmp_path, ["--preset", "nano", "--tp", "2", "--seq", "32", "--mbs", "1", "--gbs", "2",
                              "--warmup", "0", "--steps", "1", "--vocab-size", "300", "--backends", "native",
                              "--peft", "lora", "--lora-rank", "4", "--lora-targets", *LORA_ALL], nproc=2)
    arch = dataclasses.replace(PRESETS["nano"], vocab_size=300)
    layout = planner.Layout(tp=2, pp=1, vp=None, dp=1, mbs=1, recompute="none", distributed_optimizer=True)
    peft = PeftConfig(method="lora", rank=4, target_modules=LORA_ALL)
    row = report["results"][0]
    assert row["backend"] == "native+lora" and "error" not in row, row
    for r in row["ranks"]:
        predicted = planner.stage_memory(arch, layout, 32, 2, "fp32", 0, peft)
        assert predicted.params == r["params"]
        assert predicted.trainable == r["trainable_params"]
        assert predicted.weights == r["param_bytes"]
        assert predicted.grads == r["main_grad_bytes"]
        assert predicted.optimizer == r["optimizer_state_bytes"]
    base = planner.stage_parameter_count(arch, 512, 2, 1, None, 0)
    assert row["ranks"][0]["trainable_params"] < base < row["ranks"][0]["params"]


def test_lora_memory_keeps_the_base_weights_only():
    """Me-LLaMA-chat's LoRA (rank 16 on the four linears) on LLaMA-2 70B: 207,093,760 adapter
    parameters by hand (80 layers x 16 x the in + out features of q, k, v, o, gate, up, down); on one
    GPU the planner holds all of them, with grads and Adam state, and the base's weights alone."""
    arch = PRESETS["llama2-70b"]
    peft = PeftConfig(method="lora", rank=16)
    h, f, kv = 8192, 28672, 1024
    by_hand = 80 * 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))
    assert by_hand == 207_093_760
    one = planner.Layout(1, 1, None, 1, 1, "selective", False)
    full, lora = (planner.stage_memory(arch, one, 4096, 8, "bf16", 0, p) for p in (None, peft))
    assert lora.trainable == by_hand and lora.params == full.params + by_hand
    assert lora.weights == 2 * lora.params and lora.grads == 4 * by_hand and lora.optimizer == 12 * by_hand
    # TP 8 x PP 4 x DP 4 with the distributed optimizer: per GPU, a quarter of the layers, adapters
    # sharded as lora.py shards them, and Adam state divided over data parallelism
    spread = planner.Layout(8, 4, None, 4, 1, "selective", True)
    stages = [planner.stage_memory(arch, spread, 4096, 64, "bf16", r, peft) for r in range(4)]
    replicated_a = 20 * 16 * (3 * h + 2 * h)  # qkv and fc1 pieces: A [r, h] on every TP rank
    split_b = 20 * 16 * (h + 2 * kv + 2 * f) // 8
    replicated_b = 20 * 16 * (h + h)  # o and down: B [out, r] on every TP rank
    split_a = 20 * 16 * (h + f) // 8
    assert all(m.trainable == replicated_a + split_b + replicated_b + split_a for m in stages)
    assert all(m.optimizer == 12 * m.trainable / 4 for m in stages)


def test_lora_activations_without_dropout_at_tp1_add_the_adapters_own():
    """At TP 1 without dropout the adapters' inputs are the frozen linears' inputs full fine-tuning
    stores anyway (qkv and fc1 in, attention output, fc2 in): the difference per layer is u = A(x) of
    the 7 pieces (rank-sized, bf16) per token, and the fused q|k|v and gate|up B per micro-batch."""
    arch = PRESETS["llama2-7b"]
    h, f, r, tokens = 4096, 11008, 8, 4096
    peft = PeftConfig(method="lora", rank=r, dropout=0.0)
    full = planner.activation_bytes_per_layer(arch, tokens, 1, "none")
    lora = planner.activation_bytes_per_layer(arch, tokens, 1, "none", peft, 32000)
    assert lora - full == 2 * (tokens * 7 * r + (3 * h) * 3 * r + (2 * f) * 2 * r)
    # dropout: each piece (q, k, v | o | gate, up | down) stores its own dropped input (bf16) and mask
    # (1 B) instead of sharing the one input (qkv in, fc1 in, fc2 in: the attention output is kept anyway)
    dropped = planner.activation_bytes_per_layer(arch, tokens, 1, "none", dataclasses.replace(peft, dropout=0.05),
                                                 32000)
    assert dropped - lora == tokens * (3 * (3 * h + h + 2 * h + f) - 2 * (h + h + f))


def test_lora_plan_from_a_recipe_and_flags(tmp_path, capsys):
    """70B LoRA fits on 8 x H100 where full fine-tuning does not; the recipe's peft section is used
    and --lora-rank overrides it."""
    recipe = tmp_path / "chat.yaml"
    recipe.write_text("model: {preset: llama2-70b}\ntraining: {seq_length: 4096, global_batch_size: 128}\n"
                      "peft: {method: lora, rank: 8, dropout: 0.0}\n")
    out = tmp_path / "plan.json"
    assert run_main(planner.main, ["--config", str(recipe), "--gpu", "h100-80gb", "--gpus", "8", "--top", "2",
                                   "--lora-rank", "16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["peft"]["method"] == "lora" and report["peft"]["rank"] == 16 and report["peft"]["dropout"] == 0.0
    assert report["layouts"] and all(e["fits"] for e in report["layouts"])
    assert all(e["trainable_params_per_gpu"] < e["params_per_gpu"] / 100 for e in report["layouts"])
    assert "207.1M trainable parameters" in capsys.readouterr().out
    assert run_main(planner.main, ["--preset", "llama2-70b", "--gpu", "h100-80gb", "--gpus", "8", "--gbs", "128"]) == 2
    assert "nothing fits" in capsys.readouterr().err
    assert run_main(planner.main, ["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--peft", "lora",
                                   "--lora-rank", "0"]) == 2
    assert "--lora-rank must be >= 1" in capsys.readouterr().err


def test_stage_counts_add_up_to_the_preset_parameter_counts():
    expected = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98}
    for name, billions in expected.items():
        arch = PRESETS[name]
        assert round(parameter_count(arch) / 1e9, 2) == billions
        for pp, vp in ((1, None), (2, None), (4, 2), (8, 5 if arch.num_layers % 40 == 0 else None)):
            if arch.num_layers % (pp * (vp or 1)):
                continue
            total = sum(planner.stage_parameter_count(arch, arch.vocab_size, 1, pp, vp, r) for r in range(pp))
            assert total == parameter_count(arch), (name, pp, vp)


def test_distributed_optimizer_shards_only_the_optimizer_state():
    arch = PRESETS["llama2-13b"]
    off = planner.Layout(4, 2, None, 4, 1, "selective", False)
    on = dataclasses.replace(off, distributed_optimizer=True)
    m_off, m_on = (planner.stage_memory(arch, lay, 4096, 64, "bf16", 0) for lay in (off, on))
    assert m_on.weights == m_off.weights == 2 * m_off.params
    assert m_on.grads == m_off.grads == 4 * m_off.params
    assert m_off.optimizer == 12 * m_off.params and m_on.optimizer == m_off.optimizer / 4


# -- validity --------------------------------------------------------------------------------------
def _independently_valid(arch, lay: planner.Layout, gpus: int, gbs: int) -> bool:
    micro = gbs // (lay.mbs * lay.dp)
    return (lay.tp * lay.pp * lay.dp == gpus and lay.tp in (1, 2, 4, 8)
            and arch.num_attention_heads % lay.tp == 0 and arch.num_query_groups % lay.tp == 0
            and arch.num_layers % (lay.pp * lay.chunks) == 0 and gbs % (lay.mbs * lay.dp) == 0
            and (lay.vp is None or micro % lay.pp == 0))


def test_every_listed_layout_passes_the_trunk_checks(plan_70b):
    arch = PRESETS["llama2-70b"]
    assert plan_70b.fitting
    for e in plan_70b.estimates:
        assert _independently_valid(arch, e.layout, 160, 1000), e.layout
    for e in plan_70b.fitting[:20]:  # the printed overrides, as a user pastes them, are accepted
        cfg = load_config(None, ["model.preset=llama2-70b", *e.layout.overrides(4096, 1000)])
        validate(resolve(cfg, GPU_ENV), arch, GPU_ENV)  # what `melama train` does on 160 GPUs
    # The enumeration is not trivially small: every TP size yields valid layouts for 70B on 160 GPUs.
    assert {e.layout.tp for e in plan_70b.estimates} == {1, 2, 4, 8}


def test_small_model_plan_on_one_node_is_valid_and_sorted():
    arch = PRESETS["llama2-7b"]
    result = planner.plan(arch, "llama2-7b", gpu="h100-80gb", gpus=8, seq=4096, gbs=64)
    assert result.fitting
    mfus = [e.mfu for e in result.fitting]
    assert mfus == sorted(mfus, reverse=True)
    for e in result.estimates:
        assert _independently_valid(arch, e.layout, 8, 64)


def test_me_llama_recipe_layout_is_judged_to_fit(plan_70b):
    cfg = load_config(ME_LLAMA)
    p, t = cfg.parallel, cfg.training
    recipe = planner.Layout(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, 160 // (p.tensor_parallel * p.pipeline_parallel),
                            t.micro_batch_size, t.recompute, True)
    assert (recipe.tp, recipe.pp, recipe.vp, recipe.dp, recipe.mbs, recipe.recompute) == (8, 4, 5, 5, 1, "selective")
    listed = {e.layout: e for e in plan_70b.estimates}
    assert recipe in listed and listed[recipe].fits
    assert listed[recipe].memory.total < 80 * 2**30


def test_predicted_flops_count_the_padded_vocabulary_as_the_trainer_does(plan_70b):
    """TFLOP/s = tokens/s x the trunk's FLOPs per token over the vocabulary padded for that layout's TP
    (70B's 32000 tokens: 32000 rows at TP 1 and 2, 32256 at TP 4, 32768 at TP 8)."""
    from melama_mcore.models.llama.config_registry import flops_per_token

    arch = PRESETS["llama2-70b"]
    seen = set()
    for e in plan_70b.estimates:
        padded = padded_vocab_size(arch.vocab_size, 128, e.layout.tp)
        assert planner.padded_vocab(arch, e.layout.tp) == padded
        expected = e.tokens_per_s_per_gpu * flops_per_token(arch, 4096, padded) / 1e12
        assert e.tflops_per_gpu == pytest.approx(expected, rel=1e-12), e.layout
        seen.add(padded)
    assert seen == {32000, 32256, 32768}


def test_recipe_check_from_the_cli(capsys):
    assert run_main(planner.main, ["--config", str(ME_LLAMA), "--gpu", "a100-80gb", "--gpus", "160", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "llama2_70b_me_llama.yaml: fits" in out
    assert "parallel.tensor_parallel=" in out and "training.micro_batch_size=" in out


# -- bad and impossible requests -------------------------------------------------------------------
def test_70b_on_one_40gb_gpu_reports_that_nothing_fits(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = run_main(planner.main, ["--preset", "llama2-70b", "--gpu", "a100-40gb", "--gpus", "1", "--gbs", "8",
                                   "--json", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing fits in 40.0 GiB" in err and "weights" in err and "optimizer" in err
    assert "nothing fits" in json.loads(out.read_text())["nothing_fits"]


def test_no_valid_layout_says_why(capsys):
    # 3 GPUs: DP 3 cannot split a global batch of 4, and 32 layers do not split over 3 stages.
    assert run_main(planner.main, ["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "3", "--gbs", "4"]) == 2
    err = capsys.readouterr().err
    assert "no parallel layout is valid" in err and "global_batch_size" in err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "0"], "--gpus must be >= 1"),
    (["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--gpu-memory-gib", "-1"], "--gpu-memory-gib"),
    (["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--compute-efficiency", "1.5"], "--compute-efficiency"),
    (["--gpu", "h100-80gb", "--gpus", "8"], "give --preset or --config"),
    (["--preset", "nano", "--gpu", "h100-80gb", "--gpus", "1"], "vocab_size"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys):
    assert run_main(planner.main, argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_gpu_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        planner.main(["--preset", "llama2-7b", "--gpu", "v100", "--gpus", "8"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        planner.main(["--help"])
    assert "fit in GPU memory" in capsys.readouterr().out


def test_json_lists_top_k(tmp_path):
    out = tmp_path / "new" / "plan.json"  # its folder made, as for every output
    assert run_main(planner.main, ["--preset", "llama2-13b", "--gpu", "h200", "--gpus", "16", "--gbs", "128",
                                   "--top", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["layouts"]) == 3 and report["fitting_layouts"] >= 3
    assert all(r["fits"] for r in report["layouts"])
    assert [p.name for p in out.parent.iterdir()] == ["plan.json"]  # written whole: no temporary file left


@pytest.mark.parametrize("where", ["a folder", "under a file", "under /proc"])
def test_a_json_path_that_cannot_be_written_is_refused_before_planning(where, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    path, message = {"a folder": (tmp_path, f"--json {tmp_path} is a folder; give a file name"),
                     "under a file": (tmp_path / "afile" / "plan.json",
                                      f"--json {tmp_path / 'afile' / 'plan.json'}: {tmp_path / 'afile'} is a file"),
                     "under /proc": ("/proc/melama/plan.json", "cannot create the folder /proc/melama")}[where]
    assert run_main(planner.main, ["--preset", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--json",
                                   str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


# -- on a GPU: predicted vs measured peak memory --------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares predicted memory "
                    "with torch.cuda.max_memory_allocated of a real run")
def test_predicted_peak_memory_matches_a_real_run_on_gpu(tmp_path):
    """Full fine-tuning and LoRA (rank 16, dropout 0.05, the four linears: the recipe defaults)."""
    report = bench(tmp_path, ["--preset", "llama2-7b", "--layers", "2", "--seq", "2048", "--mbs", "1", "--gbs", "4",
                              "--warmup", "1", "--steps", "1", "--backends", "native", "--peft", "none", "lora"],
                   nproc=1)
    arch = dataclasses.replace(PRESETS["llama2-7b"], num_layers=2)
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    layout = planner.Layout(1, 1, None, 1, 1, "none", True)
    full, lora = report["results"]
    for r, peft in ((full, None), (lora, PeftConfig(method="lora"))):
        rank = r["ranks"][0]
        predicted = planner.stage_memory(arch, layout, 2048, 4, "bf16", 0, peft)
        assert (rank["params"], rank["trainable_params"]) == (predicted.params, predicted.trainable)
        # Static state is exact (above); activations and allocator overheads are a model: within 25%.
        assert r["peak_memory_gib"] == pytest.approx(r["predicted_memory_gib"], rel=0.25), r["backend"]
    assert full["ranks"][0]["params"] == planner.stage_parameter_count(arch, padded, 1, 1, None, 0)
