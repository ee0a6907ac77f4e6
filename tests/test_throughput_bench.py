"""benchmarks/throughput.py on CPU: it runs megatron's real training step for every backend listed,
its JSON parses, and its throughput figures agree with the trunk's FLOP formula for the layers it
built (not the preset's) and the padded vocabulary it built (300 tokens -> 384 rows at TP 1, 512 at
TP 2). No speed is asserted: timings are readouts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from melama_mcore.models.llama.config_registry import flops_per_token
from melama_mcore.models.llama.config_registry import PRESETS, padded_vocab_size
from trunk_fixtures import free_port

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
VOCAB = 300  # not a multiple of 128: the padded output layer counts
TINY = ["--preset", "nano", "--seq", "64", "--mbs", "2", "--gbs", "4", "--warmup", "1", "--steps", "2",
        "--vocab-size", str(VOCAB)]


def run_bench(tmp_path: Path, args: list[str], nproc: int = 1) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([*launcher, str(BENCH), *args, "--json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, timeout=300, cwd=tmp_path)
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
