"""Stage e, LoRA on a 13B-shaped slice: 4 decoder layers of LLaMA-2 13B (hidden 5120, 40 heads,
FFN 13824), seq 4096, bf16, rank-16 adapters on the four linears of every layer (the recipe's
defaults), the base frozen, through the trainer's step (benchmarks/throughput.py --peft lora): step
time, MFU counted as the planner counts a LoRA step (no weight gradients for frozen linears, 6 FLOPs
per adapter parameter and token), and `max_memory_allocated` beside the planner's prediction."""

from __future__ import annotations

from gpu_check import bench
from gpu_check.runner import Context, Mode, Stage

SLICE = ["--preset", "llama2-13b", "--layers", "4", "--seq", "4096", "--mbs", "1", "--gbs", "8", "--backends", "native",
         "--peft", "lora", "--warmup", "2", "--steps", "5"]
SMOKE = ["--preset", "nano", "--layers", "2", "--seq", "64", "--mbs", "2", "--gbs", "4", "--backends", "native",
         "--peft", "lora", "--lora-rank", "4", "--warmup", "1", "--steps", "1", "--vocab-size", "256"]


def run(ctx: Context) -> None:
    if ctx.lacks_gpu("LoRA slice"):
        return
    rows = bench.run(ctx, "throughput", SMOKE if ctx.mode.smoke else SLICE)
    bench.record_rows(ctx, rows)
    ctx.record.summary = "; ".join(bench.describe(r) + f", {r['trainable_params']:,} trainable parameters"
                                   for r in rows if "error" not in r)


def plan(mode: Mode) -> list[str]:
    return [f"python benchmarks/throughput.py {' '.join(SMOKE if mode.smoke else SLICE)} --json ..."]


STAGE = Stage("e", "LoRA, 13B-shaped slice", 60, run, plan)
