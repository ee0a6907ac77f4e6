"""MFU and the per-step metrics stream (console, TensorBoard, JSONL).

MFU = model FLOPs per token (the model registry's `flops_per_token`, Megatron's convention, over
the padded vocabulary the output layer is built with) x tokens/s / GPUs / dense peak of the GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU (no sparsity), by precision; matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": None},
}


def peak_tflops(precision: str, fp8: bool, override: float | None) -> float | None:
    """Peak dense TFLOP/s of this GPU, or None when unknown (CPU, or a GPU not in the table)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks["fp8" if fp8 else "bf16"] if precision == "bf16" else None
    return None


def memory_gib() -> float:
    """Peak GPU memory allocated by torch, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    step_time_s: float
    tokens: int  # tokens processed this step, all data-parallel ranks together
    skipped: bool = False
    packing_efficiency: float | None = None  # packed instruction data: real tokens / sequence positions


class MetricsLogger:
    """Writes step metrics to the console, TensorBoard and <output_dir>/metrics.jsonl (one process)."""

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool, num_gpus: int,
                 flops_per_token: float, peak_tflops: float | None, train_iters: int, first_step: int = 0):
        self.enabled = enabled
        self.first_step = first_step  # the step this process started after (a resumed run's ETA counts from it)
        self.device = "gpu" if torch.cuda.is_available() else "process"
        self.num_gpus = num_gpus
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops
        self.train_iters = train_iters
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self._start = time.time()

    def throughput(self, stats: StepStats) -> dict:
        tokens_per_s = stats.tokens / stats.step_time_s
        tflops = tokens_per_s * self.flops_per_token / self.num_gpus / 1e12
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.num_gpus,
            "tflops_per_gpu": tflops,
        }
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out

    def log_step(self, stats: StepStats) -> dict:
        record = {
            "step": stats.step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "step_time_s": stats.step_time_s,
            "skipped": stats.skipped,
            **self.throughput(stats),
            "memory_gib": memory_gib(),
        }
        if stats.packing_efficiency is not None:
            record["packing_efficiency"] = stats.packing_efficiency
        if not self.enabled:
            return record
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, stats.step)
        elapsed = time.time() - self._start
        eta = elapsed / max(1, stats.step - self.first_step) * (self.train_iters - stats.step)
        mfu = f" | MFU {record['mfu'] * 100:.1f}%" if "mfu" in record else ""
        if stats.packing_efficiency is not None:
            mfu += f" | packing {stats.packing_efficiency:.1%}"
        gnorm = f"{stats.grad_norm:.3f}" if stats.grad_norm is not None and math.isfinite(stats.grad_norm) else str(stats.grad_norm)
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad norm %s | %.0f tok/s (%.0f tok/s/%s) | "
            "%.3g TFLOP/s/%s%s | mem %.2f GiB | %.2f s/step | eta %s%s",
            stats.step, self.train_iters, stats.loss, stats.lr, gnorm, record["tokens_per_s"],
            record["tokens_per_s_per_gpu"], self.device, record["tflops_per_gpu"], self.device, mfu, record["memory_gib"],
            stats.step_time_s, _hms(eta), " | SKIPPED (non-finite)" if stats.skipped else "",
        )
        return record

    def log_eval(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled or not losses:  # no validation data (logging.eval_iters=0): nothing to say
            return
        record = {"step": step, "eval": {name: {"loss": loss, "ppl": math.exp(min(loss, 50))} for name, loss in losses.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, loss in losses.items():
                self.writer.add_scalar(f"valid/{name}/loss", loss, step)
        log.info("validation at step %d | %s", step,
                 " | ".join(f"{name} loss {loss:.4f} ppl {math.exp(min(loss, 50)):.2f}" for name, loss in losses.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
