"""benchmarks/throughput.py as stages d and e use it: through its command line and its JSON, field by
field, so a change of its format stops the stage with what changed rather than a KeyError."""

from __future__ import annotations

import json

from gpu_check.runner import ROOT, Context, StageError

SCRIPT = ROOT / "benchmarks" / "throughput.py"
FIELDS = ("step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_memory_gib", "predicted_memory_gib",
          "all_steps_ok")


def field(row: dict, name: str):
    if name not in row:
        raise StageError(f"benchmarks/throughput.py's JSON has no {name!r} in its rows (its format changed?)")
    return row[name]


def run(ctx: Context, label: str, args: list[str]) -> list[dict]:
    """The benchmark's rows (one per backend / LoRA / data variant), with the fields stages read."""
    out = ctx.work / f"{label}.json"
    ctx.job(label, SCRIPT, [*args, "--json", out])
    rows = json.loads(out.read_text()).get("results")
    if not rows:
        raise StageError("benchmarks/throughput.py wrote no results")
    for row in rows:
        if "error" not in row:
            for name in FIELDS:
                field(row, name)
    return rows


def describe(row: dict) -> str:
    """`native: 1.234 s/step, 26,600 tokens/s/GPU, 412 TFLOP/s, MFU 41.7%, peak 45.1 GiB (planner 43)`."""
    mfu = f"MFU {row['mfu']:.1%}" if row["mfu"] is not None else "MFU n/a"
    peak = f"peak {row['peak_memory_gib']:.3g} GiB" if row["peak_memory_gib"] is not None else "peak n/a"
    return (f"{row['backend']}: {row['step_time_s']:.3f} s/step, {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
            f"{row['tflops_per_gpu']:.4g} TFLOP/s, {mfu}, {peak} (planner {row['predicted_memory_gib']:.3g})")


def record_rows(ctx: Context, rows: list[dict]) -> None:
    """A part per row, the figures as metrics. The native backend (the trainer's default without TE)
    must run every step; another backend that cannot run here (megatron's unfused `local` out of
    memory at seq 4096, say) is reported as such, not as a failure of the check."""
    for row in rows:
        ctx.record.metrics.setdefault("rows", []).append({k: v for k, v in row.items() if k != "ranks"})
        if "error" in row and row["backend"].split("+")[0] != "native":
            ctx.skip(row["backend"], f"could not run here: {row['error']}")
            continue
        if "error" in row:
            ctx.part(row["backend"], False, row["error"])
        else:
            ctx.part(row["backend"], row["all_steps_ok"], describe(row) + ("" if row["all_steps_ok"] else
                                                                           "; a step was skipped"))
