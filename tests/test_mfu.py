"""One MFU for one run: the trainer (its FLOPs per token into its metrics logger), the throughput
benchmark (its summary of measured ranks) and the planner (its estimate) count a LoRA step's FLOPs
alike, so that for the same step time they report the same MFU; and that count is LoRA's (frozen
linears compute no weight gradient), derived here by hand, not full training's. The trainer's own
metrics.jsonl is checked against the same count in test_sft_training.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from melama_mcore import step
from melama_mcore.commands import plan as planner
from melama_mcore.components.metrics import PEAK_TFLOPS, MetricsLogger, StepStats
from melama_mcore.config.job_config import load_config
from melama_mcore.models.llama.config_registry import flops_per_token, resolve_arch
from melama_mcore.strategies import strategy_for

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SEQ, GBS, GPUS, TP, RANK = 4096, 64, 8, 2, 16


def throughput_benchmark():
    """benchmarks/throughput.py as a module (it imports its neighbour sft_packing.py)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("throughput_benchmark", BENCHMARKS / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def lora_flops_by_hand(arch, padded_vocab: int) -> float:
    """Full training's Megatron count, minus the weight gradients of every frozen linear (2 FLOPs
    per weight and token), plus 6 FLOPs per adapter parameter and token (rank x (in + out) for each
    of q, k, v, o, gate, up, down)."""
    h, f, layers = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    linear_weights = layers * (h * (q + 2 * kv) + q * h + 3 * h * f) + padded_vocab * h
    modules = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    adapters = layers * sum(RANK * (i + o) for i, o in modules)
    return flops_per_token(arch, SEQ, padded_vocab) - 2 * linear_weights + 6 * adapters


def test_trainer_benchmark_and_planner_report_the_same_lora_mfu(tmp_path, monkeypatch):
    cfg = load_config(None, ["model.preset=llama2-7b", f"parallel.tensor_parallel={TP}",
                             "parallel.sequence_parallel=true", f"training.seq_length={SEQ}",
                             f"training.global_batch_size={GBS}", "training.precision=bf16", "peft.method=lora",
                             f"peft.rank={RANK}"])
    arch, strategy, peak = resolve_arch(cfg.model, None), strategy_for(cfg.peft), PEAK_TFLOPS["H100"]["bf16"]
    padded = 32000  # 32000 = 125 x 128 x 2: no padding at TP 2

    # The planner's estimate for this layout, and the step time it implies.
    layout = planner.Layout(TP, 1, None, GPUS // TP, 1, "none", True)
    estimate = planner.estimate(arch, layout, gpu=planner.GPUS["h100-80gb"], gpus=GPUS, seq=SEQ, gbs=GBS,
                                gpu_memory_gib=80.0, peft=cfg.peft)
    step_time = GBS * SEQ / (estimate.tokens_per_s_per_gpu * GPUS)

    # The trainer: its FLOPs per token (step.flops_per_token, what train.py hands its metrics logger).
    trainer_fpt = step.flops_per_token(cfg, arch, strategy)
    logger = MetricsLogger(str(tmp_path), enabled=False, tensorboard=False, num_gpus=GPUS,
                           flops_per_token=trainer_fpt, peak_tflops=peak, train_iters=1)
    trainer = logger.throughput(StepStats(step=1, loss=1.0, lr=0.0, grad_norm=None, step_time_s=step_time,
                                          tokens=GBS * SEQ))

    # The benchmark: its summary of eight ranks that measured that step time on an H100.
    bench = throughput_benchmark()
    monkeypatch.setattr(bench, "peak_tflops", lambda *args: peak)
    rank = {"step_time_s": step_time, "real_tokens_per_step": GBS * SEQ, "samples_per_step": None,
            "step_real_tokens_per_step": None, "peak_memory_bytes": None, "last_step_ok": True}
    row = bench.summarise(cfg, arch, "native+lora", [dict(rank, rank=r) for r in range(GPUS)], GPUS, cfg.peft,
                          "random")

    assert trainer_fpt == pytest.approx(lora_flops_by_hand(arch, padded), rel=1e-12)
    assert trainer_fpt < 0.7 * flops_per_token(arch, SEQ, padded)  # not full training's count
    assert row["flops_per_token"] == pytest.approx(trainer_fpt, rel=1e-12)
    assert trainer["mfu"] == pytest.approx(row["mfu"], rel=1e-12)
    assert trainer["mfu"] == pytest.approx(estimate.mfu, rel=1e-9)
    assert trainer["tflops_per_gpu"] == pytest.approx(estimate.tflops_per_gpu, rel=1e-9)

    # Full training: the same agreement, on full training's count.
    full = dataclasses.replace(cfg.peft, method="none")
    cfg.peft = full
    assert step.flops_per_token(cfg, arch, strategy_for(full)) == flops_per_token(arch, SEQ, padded)
    assert bench.summarise(cfg, arch, "native", [dict(rank, rank=r) for r in range(GPUS)], GPUS, full,
                           "random")["flops_per_token"] == flops_per_token(arch, SEQ, padded)
