"""Stage a, environment: the GPU, its driver, torch and CUDA versions, and which optional pieces import.

Required (the later stages need them): torch, megatron-core, this project's trainer, transformers and
lm-eval. Optional pieces (Transformer Engine, flash-attn, apex, vLLM, DALI) are reported as available
or unavailable, never as failures: NVIDIA's containers ship them, this machine's image does not, and
the trainer runs without them.

    python -m gpu_check.stage_env --json PATH     # the probe, run as a job
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

from gpu_check.runner import Context, Mode, Stage

# module -> distribution whose version is reported
REQUIRED = {"torch": "torch", "megatron.core": "megatron-core", "melama_mcore.train": None,
            "transformers": "transformers", "lm_eval": "lm-eval"}
OPTIONAL = {"transformer_engine": "transformer-engine", "flash_attn": "flash-attn", "apex": "apex",
            "vllm": "vllm", "nvidia.dali": "nvidia-dali-cuda130", "triton": "triton", "peft": "peft",
            "accelerate": "accelerate", "datasets": "datasets", "sentencepiece": "sentencepiece",
            "rouge_score": "rouge-score", "seqeval": "seqeval", "bert_score": "bert-score",
            "sklearn": "scikit-learn", "zstandard": "zstandard"}
NOT_FAILURES = ("transformer_engine", "flash_attn", "apex", "vllm", "nvidia.dali")


def _command_output(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None and not os.access(argv[0], os.X_OK):
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _import(module: str, dist: str | None) -> dict:
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001  (TE raises RuntimeError without its CUDA libraries)
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]}
    try:
        return {"ok": True, "version": version(dist) if dist else None}
    except PackageNotFoundError:
        return {"ok": True, "version": None}


def _maybe(read):
    """A fact this torch cannot tell is left out (None), not a failed probe."""
    try:
        return read()
    except Exception:  # noqa: BLE001
        return None


def _nvcc() -> str | None:
    from melama_mcore.kernels.build import BuildError, find_nvcc  # the nvcc the kernel build will use

    try:
        text = _command_output([find_nvcc(), "--version"]) or ""
    except BuildError:
        return None
    return next((line.split("release ", 1)[1] for line in text.splitlines() if "release " in line), None)


def probe() -> dict:
    import torch

    facts: dict = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                   "cuda": torch.cuda.is_available(), "cuda_runtime": torch.version.cuda}
    if facts["cuda"]:
        props = torch.cuda.get_device_properties(0)
        smi = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        facts.update(
            name=props.name, devices=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
            driver=smi.splitlines()[0] if smi else None, nvcc=_nvcc(),
            nccl=_maybe(lambda: ".".join(map(str, torch.cuda.nccl.version()))),
            cudnn=_maybe(torch.backends.cudnn.version),
            sdpa_flash_available=_maybe(torch.backends.cuda.is_flash_attention_available))
    facts["imports"] = {m: _import(m, d) for m, d in {**REQUIRED, **OPTIONAL}.items()}
    return facts


def run(ctx: Context) -> None:
    out = ctx.work / "env.json"
    ctx.job("probe", "gpu_check.stage_env", ["--json", out])
    facts = json.loads(out.read_text())
    ctx.facts["cuda"] = facts["cuda"]
    ctx.facts["device"] = facts
    ctx.record.metrics.update(facts)
    imports = facts["imports"]
    missing = [m for m in REQUIRED if not imports[m]["ok"]]
    ctx.part("required imports", not missing,
             "; ".join(f"{m}: {imports[m]['error']}" for m in missing) or ", ".join(REQUIRED))
    if not ctx.mode.smoke:
        ctx.part("CUDA device", facts["cuda"], facts.get("name") or "torch.cuda.is_available() is False: "
                 "on a CPU machine run run.sh --cpu-smoke")
    if not facts["cuda"]:
        ctx.skip("GPU facts", "no CUDA device")

    def version(module):
        return imports[module].get("version") or "?"

    present = [f"{m} {version(m)}" for m in ("megatron.core", "lm_eval", "transformers", "triton") if imports[m]["ok"]]
    absent = [m for m in NOT_FAILURES if not imports[m]["ok"]]
    ctx.record.summary = (", ".join(present) + (f"; unavailable (not failures): {', '.join(absent)}" if absent else "")
                          + (f"; nvcc {facts['nvcc']}" if facts.get("nvcc") else ""))


def plan(mode: Mode) -> list[str]:
    return ["python -m gpu_check.stage_env: GPU, driver, CUDA, NCCL, nvcc, torch; imports megatron-core, the trainer, "
            "transformers, lm-eval (required) and TE, flash-attn, apex, vLLM, DALI (reported, never failures)"]


STAGE = Stage("a", "environment", 25, run, plan)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="probe the environment, write JSON")
    parser.add_argument("--json", required=True)
    path = parser.parse_args().json
    with open(path, "w") as f:
        json.dump(probe(), f, indent=1)
    sys.exit(0)
