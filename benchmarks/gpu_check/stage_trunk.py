"""Stage c, the trunk on one GPU: `melama train` of a tiny LLaMA in bf16 with the distributed
optimizer on one process (NCCL, world 1), its losses against the same run in fp32 on the CPU, and a
save and an exact resume.

Every run starts from one seed checkpoint (`--create-seed-checkpoint`: GPU and CPU initialise
weights differently) and reads the same synthetic corpus (fixtures.py) in the same order:
* CPU fp32 reference, N steps;
* the device run, N steps: its losses within bf16's tolerance of the reference's;
* the device run again in another folder, stopped after step N/2 (a checkpoint), then the same
  command again: it resumes, and steps N/2+1..N equal the uninterrupted run's exactly. If they do not,
  the uninterrupted run is repeated to tell GPU non-determinism from a resume bug.
In --cpu-smoke the device run is the CPU's bf16 production path (the same flags, on gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_check import fixtures
from gpu_check.runner import Context, Mode, Stage

STEPS, STOP_AT = 8, 4
BF16_RTOL = 2e-2  # bf16 keeps 8 significant bits (4e-3 relative): a few roundings' worth, far below a defect
TRAIN = ["model.preset=nano", "training.seq_length=64", "training.micro_batch_size=2",
         "training.global_batch_size=8", f"training.train_iters={STEPS}", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4",
         "optimizer.lr_warmup_iters=1", "logging.log_interval=1", "logging.eval_iters=0",
         "logging.tensorboard=false", "checkpoint.save_interval=1000"]
REFERENCE = ["training.device=cpu", "training.precision=fp32"]
PRODUCTION = ["training.precision=bf16", "parallel.use_distributed_optimizer=true"]


def device_flags(mode: Mode) -> list[str]:
    return [f"training.device={'cpu' if mode.smoke else 'cuda'}", *PRODUCTION]


def losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl, the last record of a step winning (a resumed run appends)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def worst_relative(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


def log_facts(text: str) -> list[str]:
    """The trainer's own lines saying which backend, kernels and layout it ran."""
    return [line.split(" ", 1)[-1] for line in text.splitlines() if "layer backend:" in line or "world 1 =" in line]


def run(ctx: Context) -> None:
    if ctx.lacks_gpu("trunk"):
        return
    tokenizer, corpus = fixtures.tokenizer(ctx), fixtures.corpus(ctx)
    prefix = ctx.work / "corpus"
    ctx.job("preprocess", "melama_mcore.cli", ["preprocess", "--input", corpus, "--output-prefix", prefix,
                                               "--tokenizer-model", tokenizer, "--append-eod", "--workers", 1,
                                               "--no-progress"])
    blend = [{"name": "synthetic", "weight": 1, "train": [f"{prefix}_text_document"]}]
    common = [*TRAIN, f"data.tokenizer={tokenizer}", f"data.blend={json.dumps(blend)}"]
    seed = ctx.work / "seed"

    def train(label: str, folder: str, *flags: str):
        return ctx.job(label, "melama_mcore.train", [f"output_dir={ctx.work / folder}", *common, *flags])

    train("seed checkpoint", "seed_run", *REFERENCE, f"--create-seed-checkpoint={seed}")
    start = f"checkpoint.init_from={seed}"
    train("cpu fp32", "reference", *REFERENCE, start)
    device = device_flags(ctx.mode)
    run_log = train("device bf16", "device", *device, start).output()
    reference, uninterrupted = losses(ctx.work / "reference"), losses(ctx.work / "device")
    drift = worst_relative(uninterrupted, reference)
    ctx.part("bf16 vs CPU fp32", drift <= BF16_RTOL, f"worst relative loss difference {drift:.2e} over {STEPS} steps "
                                                     f"(tolerance {BF16_RTOL:g})")

    train("device stop", "resumed", *device, start, f"training.stop_after_step={STOP_AT}")
    train("device resume", "resumed", *device, start)
    resumed = losses(ctx.work / "resumed")
    after = {s: resumed[s] for s in range(STOP_AT + 1, STEPS + 1)}
    differ = [s for s, loss in after.items() if loss != uninterrupted[s]]
    detail = f"steps {STOP_AT + 1}-{STEPS} after the resume equal the uninterrupted run's"
    if differ:
        detail = (f"steps {differ} differ from the uninterrupted run's, by up to "
                  f"{worst_relative(uninterrupted, after):.2e} relative")
        train("device bf16 again", "device_again", *device, start)
        again = losses(ctx.work / "device_again")
        rerun = [s for s in again if again[s] != uninterrupted[s]]
        detail += (f"; a second uninterrupted run differs from the first at steps {rerun} (non-deterministic "
                   "kernels: an exact resume cannot be shown by equal losses)" if rerun
                   else "; a second uninterrupted run equals the first: the resume is not exact")
    ctx.part("save and exact resume", not differ, detail)

    ctx.record.metrics.update(reference_losses=reference, device_losses=uninterrupted, resumed_losses=resumed,
                              bf16_vs_fp32=drift, trainer=log_facts(run_log))
    ctx.record.summary = (f"loss {uninterrupted[1]:.4f} -> {uninterrupted[STEPS]:.4f} in {STEPS} steps; "
                          f"bf16 vs fp32 {drift:.1e} relative; resume after step {STOP_AT} "
                          + ("exact" if not differ else "NOT exact") + "; " + " | ".join(log_facts(run_log)))


def plan(mode: Mode) -> list[str]:
    flags = " ".join(device_flags(mode))
    return [f"melama preprocess and train-tokenizer of a synthetic corpus; melama train ({' '.join(TRAIN[:4])} ...)",
            f"{STEPS} steps CPU fp32 vs {STEPS} steps {flags} (one seed checkpoint; losses within {BF16_RTOL:g})",
            f"the same stopped after step {STOP_AT}, then resumed: steps {STOP_AT + 1}-{STEPS} must equal exactly"]


STAGE = Stage("c", "trunk on one device", 90, run, plan)
