"""benchmarks/throughput.py on CPU: it runs megatron's real training step for every backend listed,
its JSON parses, and its throughput figures agree with the trunk's FLOP formula for the layers it
built (not the preset's) and the padded vocabulary it built (300 tokens -> 384 rows at TP 1, 512 at
TP 2). No speed is asserted: timings are readouts."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from melama_mcore.models.llama.config_registry import flops_per_token
from melama_mcore.models.llama.config_registry import PRESETS, padded_vocab_size
from rank_launcher import run_ranks

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
VOCAB = 300  # not a multiple of 128: the padded output layer counts
TINY = ["--preset", "nano", "--seq", "64", "--mbs", "2", "--gbs", "4", "--warmup", "1", "--steps", "2",
        "--vocab-size", str(VOCAB)]


def run_bench(tmp_path: Path, args: list[str], nproc: int = 1) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = run_ranks(nproc, str(BENCH), [*args, "--json", str(out)], env, timeout=300,
                       log_path=tmp_path / "bench.log", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    return json.loads(out.read_text()), result.stdout


def check_consistent(report: dict, layers: int, seq: int) -> None:
    """tokens/s x FLOPs/token / GPUs = TFLOP/s, with FLOPs of the `layers` actually built and the
    output layer over the padded vocabulary (128 x TP)."""
    arch = dataclasses.replace(PRESETS["nano"], num_layers=layers, vocab_size=VOCAB)
    gpus = report["gpus"]
    layout = report["layout"]
    padded = {1: 384, 2: 512}[layout["tp"]]
    assert padded_vocab_size(VOCAB, 128, layout["tp"]) == padded
    assert report["model"]["vocab_size"] == VOCAB and report["model"]["padded_vocab_size"] == padded
    expected_fpt = flops_per_token(arch, seq, padded)
    assert report["flops_per_token"] == pytest.approx(expected_fpt, rel=1e-12)
    for r in report["results"]:
        assert "error" not in r, r
        assert r["all_steps_ok"]
        assert r["flops_per_token"] == pytest.approx(expected_fpt, rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(layout["gbs"] * seq / r["step_time_s"], rel=1e-9)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / gpus, rel=1e-9)
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s"] * expected_fpt / gpus / 1e12, rel=1e-9)
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no peak, no device memory
        assert len(r["ranks"]) == gpus


def test_single_process_compares_backends_on_the_layers_built(tmp_path):
    report, stdout = run_bench(tmp_path, TINY + ["--layers", "2"])
    assert [r["backend"] for r in report["results"]] == ["native", "local"]
    assert report["model"]["layers_built"] == 2 and report["model"]["preset_layers"] == 4
    check_consistent(report, layers=2, seq=64)
    four = flops_per_token(dataclasses.replace(PRESETS["nano"], vocab_size=VOCAB), 64, 384)
    assert report["results"][0]["flops_per_token"] < four  # the slice, not the whole preset
    for backend in ("native", "local"):
        assert backend in stdout
    assert "2 of 4 decoder layers built" in stdout


@pytest.mark.slow
def test_torchrun_tensor_parallel_divides_by_gpus(tmp_path):
    report, _ = run_bench(tmp_path, TINY + ["--tp", "2", "--backends", "native",
                                            "--cross-entropy", "megatron", "melama"], nproc=2)
    assert report["gpus"] == 2 and report["layout"]["tp"] == 2 and report["layout"]["sequence_parallel"]
    assert [r["backend"] for r in report["results"]] == ["native", "native+melama-xent"]
    check_consistent(report, layers=4, seq=64)
    ranks = report["results"][0]["ranks"]
    assert sorted(r["tp_rank"] for r in ranks) == [0, 1]


# -- instruction tuning: LoRA vs full fine-tuning, packed vs one sample per row ---------------------
LORA_RANK = 4
SFT = ["--preset", "nano", "--layers", "2", "--seq", "64", "--mbs", "2", "--gbs", "4", "--warmup", "0",
       "--steps", "1", "--vocab-size", str(VOCAB), "--backends", "native", "--lora-rank", str(LORA_RANK)]


def nano_dims(layers: int) -> tuple[int, ...]:
    a = PRESETS["nano"]
    return (layers, a.hidden_size, a.ffn_hidden_size, a.num_attention_heads * a.head_dim,
            a.num_query_groups * a.head_dim)


def adapters_by_hand(layers: int) -> int:
    """LoRA parameters on nano's four linears: rank x (in + out) for each Hugging Face module."""
    n, h, f, q, kv = nano_dims(layers)
    modules = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    return n * sum(LORA_RANK * (i + o) for i, o in modules)


def check_instruction_rows(rows: dict, positions: int) -> None:
    """The figures of every row agree with each other; packing beats one sample per row."""
    for r in rows.values():
        assert "error" not in r, r
        assert r["all_steps_ok"] and r["positions_per_step"] == positions
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens_per_step"] / r["step_time_s"], rel=1e-9)
        assert r["padding_waste"] == pytest.approx(1 - r["real_tokens_per_step"] / positions, rel=1e-9)
        assert r["tflops_per_gpu"] == pytest.approx(
            positions / r["step_time_s"] * r["flops_per_token"] / len(r["ranks"]) / 1e12, rel=1e-9)
    for peft in ("", "+lora"):
        if f"native{peft}+packed" not in rows:
            continue
        packed, unpacked = rows[f"native{peft}+packed"], rows[f"native{peft}+unpacked"]
        # the trainer's own loss reduction (real_tokens of each packed row, summed over data parallelism)
        # counts what the packing plan put in the global batch
        assert packed["step_real_tokens_per_step"] == packed["real_tokens_per_step"]
        assert unpacked["samples_per_step"] == 4 < packed["samples_per_step"]
        assert 0 < unpacked["real_tokens_per_step"] < packed["real_tokens_per_step"] <= positions
        assert packed["padding_waste"] < unpacked["padding_waste"]


def test_lora_and_packed_rows_on_cpu(tmp_path):
    report, stdout = run_bench(tmp_path, SFT + ["--peft", "none", "lora", "--data", "packed", "unpacked"])
    rows = {r["backend"]: r for r in report["results"]}
    assert list(rows) == ["native+packed", "native+unpacked", "native+lora+packed", "native+lora+unpacked"]
    check_instruction_rows(rows, positions=4 * 64)
    assert "native+lora+unpacked" in stdout

    # LoRA: the base frozen, grads and Adam state for the adapters only (fp32 on CPU: 4 B per weight and
    # grad, Adam m and v 4 B each; fp32 weights are their own master copy)
    adapters = adapters_by_hand(layers=2)
    full, lora = rows["native+packed"], rows["native+lora+packed"]
    f, a = full["ranks"][0], lora["ranks"][0]
    assert lora["trainable_params"] == a["trainable_params"] == adapters
    assert full["trainable_params"] == f["trainable_params"] == f["params"]
    assert a["params"] == f["params"] + adapters and a["param_bytes"] == 4 * a["params"]
    assert a["main_grad_bytes"] == 4 * adapters and f["main_grad_bytes"] == 4 * f["params"]
    assert a["optimizer_state_bytes"] == 2 * 4 * adapters
    assert f["optimizer_state_bytes"] == 2 * 4 * f["params"]

    # FLOPs of a LoRA step: no weight gradient for the frozen linears (2 FLOPs per weight and token),
    # 6 per adapter parameter and token
    n, h, ffn, q, kv = nano_dims(layers=2)
    linear_weights = n * (h * (q + 2 * kv) + q * h + 3 * h * ffn) + 384 * h  # + output layer, padded vocab
    assert lora["flops_per_token"] == pytest.approx(full["flops_per_token"] - 2 * linear_weights + 6 * adapters,
                                                    rel=1e-12)


@pytest.mark.slow
def test_instruction_rows_split_over_data_parallel_ranks(tmp_path):
    report, _ = run_bench(tmp_path, SFT + ["--peft", "lora", "--data", "packed", "unpacked"], nproc=2)
    assert report["layout"]["dp"] == 2
    rows = {r["backend"]: r for r in report["results"]}
    assert list(rows) == ["native+lora+packed", "native+lora+unpacked"]
    check_instruction_rows(rows, positions=4 * 64)
    for r in rows.values():
        assert [rank["trainable_params"] for rank in r["ranks"]] == [adapters_by_hand(layers=2)] * 2
