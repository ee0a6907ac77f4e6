"""Helpers for tests of the training path: a runner that launches `melama_mcore.train` (its ranks as
torchrun starts them) and reads back its metrics; the torchrun command line for tests of the launch. The tiny three-domain datasets
(`tiny_data`) are a fixture in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from melama_mcore.distributed.launch import free_local_port
from rank_launcher import run_ranks

# A 4-layer GQA model small enough for 4 CPU processes on 2 cores, yet splittable 4 ways
# (TP 2: 4 heads / 2 KV groups; PP 2 x VP 2: one layer per virtual stage).
TINY = [
    "model.preset=nano",
    "training.device=cpu",
    "training.seq_length=32",
    "training.micro_batch_size=2",
    "training.global_batch_size=8",
    "training.train_iters=3",
    "optimizer.lr=1e-3",
    "optimizer.min_lr=1e-4",
    "optimizer.lr_warmup_iters=1",
    "logging.log_interval=1",
    "logging.eval_iters=1",
    "logging.tensorboard=false",
    "checkpoint.save_interval=1000",
]


def data_overrides(tiny_data: dict) -> list[str]:
    return [f"data.tokenizer={tiny_data['tokenizer']}", f"data.blend={json.dumps(tiny_data['blend'])}"]


def train_command(nproc: int, args: list[str], module: str = "melama_mcore.train") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_local_port()), "-m", module, *args]


def run_train(output_dir: Path, overrides: list[str], nproc: int = 1, *, check: bool = True,
              timeout: float = 300, module: str = "melama_mcore.train") -> subprocess.CompletedProcess:
    """Run a training job to completion; its combined output is in the result's .stdout. The ranks are
    started as torchrun starts them, from an interpreter that has already imported the trainer
    (rank_launcher.py: the launch itself is tested with torchrun in test_launch.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = output_dir.parent / f"{output_dir.name}.{time.monotonic_ns()}.log"
    result = run_ranks(nproc, module, [f"output_dir={output_dir}", *TINY, *overrides], env, timeout=timeout,
                       log_path=log_path)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def step_records(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def eval_losses(output_dir: Path) -> dict[str, float]:
    """Validation loss per blend source of the last evaluation logged."""
    path = Path(output_dir) / "metrics.jsonl"
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "eval" in r]
    return {name: value["loss"] for name, value in evals[-1]["eval"].items()}


def losses(output_dir: Path) -> dict[int, float]:
    """step -> loss, the last record winning (a resumed run appends to the same file)."""
    return {r["step"]: r["loss"] for r in step_records(output_dir)}
