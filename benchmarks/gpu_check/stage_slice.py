"""Stage d, a 70B-shaped slice on one GPU: 2 decoder layers at hidden 8192, 64 heads, 8 KV groups,
FFN 28672, seq 4096, bf16, the trainer's step (benchmarks/throughput.py) for each layer backend that
runs here: tokens/s, TFLOP/s, MFU and `max_memory_allocated` beside the planner's prediction for the
same slice (the benchmark's `predicted_memory_gib`, from the planner's memory model).

Also named: which SDPA kernel the native backend's attention runs at these shapes (its exact call:
[s, b, h, d] permuted, causal, GQA through `enable_gqa`), from torch's dispatcher and from the aten
ops a profiled forward + backward ran; and what the planner predicts for 70B on 64 GPUs of this kind
(seq 4096, global batch 128) once told the slice's measured MFU (`melama plan --compute-efficiency`).

    python -m gpu_check.stage_slice --sdpa ... --json PATH     # the SDPA probe, run as a job
"""

from __future__ import annotations

import argparse
import json
import sys

from gpu_check import bench
from gpu_check.runner import Context, Mode, Stage

SLICE = ["--preset", "llama2-70b", "--layers", "2", "--seq", "4096", "--mbs", "1", "--gbs", "8", "--warmup", "2",
         "--steps", "5"]
SMOKE = ["--preset", "nano", "--layers", "2", "--seq", "64", "--mbs", "2", "--gbs", "4", "--warmup", "1",
         "--steps", "1", "--vocab-size", "256"]
# The SDPA call of the slice: batch, heads, KV heads, sequence, head dim, dtype (nano's in the smoke).
SDPA = {"gpu": ["1", "64", "8", "4096", "128", "bfloat16"], "smoke": ["2", "4", "2", "64", "16", "float32"]}
# `melama plan` told the native row's MFU: 70B on 64 GPUs of this kind (the published comparisons in
# benchmarks/RESULTS.md); in the smoke a one-GPU nano plan, which only exercises the command and its JSON.
PLAN = {"gpu": ["--preset", "llama2-70b", "--gpus", "64", "--seq", "4096", "--gbs", "128", "--top", "1"],
        "smoke": ["--preset", "nano", "--vocab-size", "256", "--gpus", "1", "--seq", "64", "--gbs", "4", "--top", "1"]}
PLANNER_GPUS = {"H100": "h100-80gb", "H200": "h200", "A100": "a100-80gb"}  # device name -> `melama plan --gpu`
KERNELS = ("flash", "efficient", "cudnn", "math")  # as they appear in aten::_scaled_dot_product_* op names


def sdpa_probe(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    make = [(heads, True), (kv_heads, False), (kv_heads, False)]
    q, k, v = (torch.randn(seq, batch, h, head_dim, device=device, dtype=getattr(torch, dtype)).permute(1, 2, 0, 3)
               .requires_grad_(grad) for h, grad in make)
    call = dict(is_causal=True, scale=head_dim ** -0.5, enable_gqa=heads != kv_heads)
    chosen = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, **call)).name
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, k, v, **call).sum().backward()
    ops = sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")})
    ran = sorted({kernel for kernel in KERNELS if any(kernel in op for op in ops)}) or ["math"]
    return {"device": device, "dispatcher_choice": chosen, "ran": ran, "aten_ops": ops, "shape": {
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq": seq, "head_dim": head_dim, "dtype": dtype}}


def planner_gpu(device: dict | None) -> str | None:
    name = (device or {}).get("name") or ""
    gpu = next((g for key, g in PLANNER_GPUS.items() if key in name), None)
    return "a100-40gb" if gpu == "a100-80gb" and (device or {}).get("memory_gib", 80) < 60 else gpu


def run(ctx: Context) -> None:
    if ctx.lacks_gpu("slice"):
        return
    sdpa_out = ctx.work / "sdpa.json"
    size = "smoke" if ctx.mode.smoke else "gpu"
    ctx.job("sdpa", "gpu_check.stage_slice", ["--sdpa", *SDPA[size], "--json", sdpa_out])
    sdpa = json.loads(sdpa_out.read_text())
    ctx.record.metrics["sdpa"] = sdpa
    ctx.part("SDPA kernel", True, f"{'/'.join(sdpa['ran'])} ({', '.join(sdpa['aten_ops'])}; dispatcher: "
                                  f"{sdpa['dispatcher_choice']})")

    rows = bench.run(ctx, "throughput", SMOKE if ctx.mode.smoke else SLICE)
    bench.record_rows(ctx, rows)
    native = next((r for r in rows if r["backend"] == "native" and "error" not in r), None)
    mfu = native["mfu"] if native else None
    gpu = "h100-80gb" if ctx.mode.smoke else planner_gpu(ctx.facts.get("device"))
    calibrated = ""
    if gpu is None:
        ctx.skip("planner at the measured MFU", "the planner has no entry for this GPU")
    else:
        out = ctx.work / "plan.json"
        efficiency = ["--compute-efficiency", f"{mfu:.4f}"] if mfu else []
        ctx.job("plan", "melama_mcore.cli", ["plan", *PLAN[size], "--gpu", gpu, *efficiency, "--json", out])
        planned = json.loads(out.read_text())
        best, request = planned["layouts"][0], planned["request"]
        lay = best["layout"]
        at = f"MFU {mfu:.1%}" if mfu else "its default efficiency"
        calibrated = (f"planner for {request['preset']} on {request['gpus']} x {gpu} at {at}: TP{lay['tp']} "
                      f"PP{lay['pp']} VP{lay['vp'] or 1} DP{lay['dp']}, {best['tokens_per_s_per_gpu']:,.0f} "
                      f"tokens/s/GPU, MFU {best['mfu']:.1%}")
        ctx.record.metrics["planner_at_measured_mfu"] = {"gpu": gpu, "compute_efficiency": mfu, "best": best}
        ctx.part("planner at the measured MFU", True, calibrated)
    ctx.record.summary = "; ".join([*(bench.describe(r) for r in rows if "error" not in r),
                                    f"SDPA {'/'.join(sdpa['ran'])}", *([calibrated] if calibrated else [])])


def plan(mode: Mode) -> list[str]:
    args = SMOKE if mode.smoke else SLICE
    return [f"python -m gpu_check.stage_slice --sdpa {' '.join(SDPA['smoke' if mode.smoke else 'gpu'])}  "
            "(which SDPA kernel the native attention runs)",
            f"python benchmarks/throughput.py {' '.join(args)} --json ...  (every backend that runs)",
            f"melama plan {' '.join(PLAN['smoke' if mode.smoke else 'gpu'])} --gpu <this GPU> "
            "--compute-efficiency <native MFU> --json ..."]


STAGE = Stage("d", "70B-shaped slice", 90, run, plan)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="name the SDPA kernel of the slice's attention call, write JSON")
    parser.add_argument("--sdpa", nargs=6, metavar=("BATCH", "HEADS", "KV_HEADS", "SEQ", "HEAD_DIM", "DTYPE"),
                        required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    b, h, kv, s, d, dtype = args.sdpa
    with open(args.json, "w") as f:
        json.dump(sdpa_probe(int(b), int(h), int(kv), int(s), int(d), dtype), f, indent=1)
    sys.exit(0)
