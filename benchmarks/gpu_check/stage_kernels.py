"""Stage b, csrc kernels: built for this GPU, checked against float64, timed against the copy bandwidth.

1. build: `melama_mcore.kernels` builds csrc/ for this GPU's architecture into the kernel cache the
   later stages use (what a training process does on first use), then runs its start-up self-check;
2. correctness: the GPU-only tests of tests/test_kernels.py (each kernel against a float64 formula,
   outputs pre-filled with NaN), through pytest;
3. bandwidth: benchmarks/kernels.py at LLaMA-2 70B shapes (TP 1 and 8), GB/s of the bytes each op
   must move, against this device's measured copy bandwidth and against torch eager for the same op
   (torch.compile left out: its compilation would take most of the budget).
Without a GPU, 1 and 3 are skipped with their reason and 2 must find its tests (all skipped).
If the kernels do not load, later stages run with MELAMA_KERNELS=torch instead of rebuilding.

    python -m gpu_check.stage_kernels --json PATH     # the build probe, run as a job
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check.runner import ROOT, Context, Mode, Stage

TESTS = ["tests/test_kernels.py", "-k", "cuda"]
BANDWIDTH = ["--tp", "1", "8", "--impls", "melama", "eager", "megatron", "--iters", "30", "--warmup", "5"]


def build_probe() -> dict:
    from melama_mcore import kernels
    from melama_mcore.kernels import _lib, build

    archs = _lib.device_archs()
    began = time.monotonic()
    try:
        library, error = str(build.library_path(archs)), None
    except build.BuildError as err:
        library, error = None, str(err)
    seconds = time.monotonic() - began
    backend = kernels.backend()  # loads the library, then the self-check against the reference
    return {"archs": list(archs), "build_s": seconds, "library": library, "build_error": error,
            "backend": backend, "reason": kernels._state[1]}


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped test ids and the skip reasons of a pytest --junitxml file."""
    counts: dict = {"passed": [], "failed": [], "skipped": [], "skip_reasons": set()}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"].append(name)
        elif (skipped := case.find("skipped")) is not None:
            counts["skipped"].append(name)
            counts["skip_reasons"].add((skipped.get("message") or "").removeprefix("Skipped: "))
        else:
            counts["passed"].append(name)
    counts["skip_reasons"] = sorted(counts["skip_reasons"])
    return counts


def bandwidth_summary(report: dict) -> tuple[str, dict]:
    """One line (fwd+bwd at TP 1: melama's GB/s, its share of the copy bandwidth, its speed-up over
    torch eager, and megatron's cross-entropy beside ours) and {op TP pass: figures}."""
    table: dict = {}
    for row in report["rows"]:
        table.setdefault(f"{row['op']} tp{row['tp']} {row['pass']}", {})[row["impl"]] = row
    figures = {}
    for key, impls in table.items():
        ours, eager, megatron = impls.get("melama"), impls.get("eager"), impls.get("megatron")
        figures[key] = {"gb_per_s": ours and ours["gb_per_s"], "of_copy": ours and ours["of_copy"],
                        "eager_gb_per_s": eager and eager["gb_per_s"],
                        "speedup_vs_eager": ours and eager and eager["median_ms"] / ours["median_ms"],
                        "megatron_gb_per_s": megatron and megatron["gb_per_s"]}
    cells = []
    for key, f in figures.items():
        if key.endswith("tp1 fwd+bwd") and f["gb_per_s"] is not None:
            cell = f"{key.split(' tp')[0]} {f['gb_per_s']:,.0f} ({f['of_copy']:.0%}"
            cell += f", {f['speedup_vs_eager']:.2f}x eager" if f["speedup_vs_eager"] else ""
            cell += f", megatron {f['megatron_gb_per_s']:,.0f}" if f["megatron_gb_per_s"] else ""
            cells.append(cell + ")")
    text = (f"copy {report['copy_gb_per_s']:,.0f} GB/s; fwd+bwd at TP 1, GB/s (% of copy, vs eager): "
            + "; ".join(cells))
    return text, figures


def run(ctx: Context) -> None:
    summary = []
    if ctx.cuda:
        out = ctx.work / "build.json"
        ctx.job("build", "gpu_check.stage_kernels", ["--json", out])
        built = json.loads(out.read_text())
        ctx.record.metrics["build"] = built
        archs = "+".join(f"sm_{a}" for a in built["archs"])
        loaded = ctx.part("build and self-check", built["backend"] == "cuda",
                          f"{archs} in {built['build_s']:.0f} s" if built["backend"] == "cuda" else built["reason"])
        if loaded:
            summary.append(f"built {archs} in {built['build_s']:.0f} s, self-check passed")
        else:
            ctx.env["MELAMA_KERNELS"] = "torch"  # later stages: the reference, not a rebuild per process
            summary.append("later stages use MELAMA_KERNELS=torch")
    else:
        ctx.skip("build", "no CUDA device (CI compiles csrc/ for sm_80 and sm_90: tests/test_kernels_compile.py)")

    junit = ctx.work / "tests.xml"
    ctx.job("tests", "pytest", ["-q", "-p", "no:cacheprovider", *TESTS, "--junitxml", junit], cwd=ROOT, check=False)
    counts = junit_counts(junit) if junit.exists() else None
    name = "float64 references (pytest " + " ".join(TESTS) + ")"
    ctx.record.metrics["tests"] = counts
    if counts is None or not (counts["passed"] or counts["failed"] or counts["skipped"]):
        ctx.part(name, False, "pytest selected no test (were the GPU tests renamed?)")
    elif counts["failed"] or ctx.cuda:
        ctx.part(name, not counts["failed"] and bool(counts["passed"]),
                 f"{len(counts['passed'])} passed, {len(counts['failed'])} failed"
                 + (f": {', '.join(counts['failed'][:5])}" if counts["failed"] else ""))
        summary.append(f"{len(counts['passed'])} GPU tests passed, {len(counts['failed'])} failed")
    else:
        ctx.skip(name, f"{len(counts['skipped'])} GPU tests skipped ({'; '.join(counts['skip_reasons'])})")

    if ctx.cuda:
        out = ctx.work / "kernels.json"
        ctx.job("bandwidth", ROOT / "benchmarks" / "kernels.py", [*BANDWIDTH, "--json", out])
        text, figures = bandwidth_summary(json.loads(out.read_text()))
        ctx.record.metrics["bandwidth"] = figures
        ctx.part("bandwidth", True, text)
        summary.append(text)
    else:
        ctx.skip("bandwidth", "no CUDA device")
    ctx.record.summary = "; ".join(summary)


def plan(mode: Mode) -> list[str]:
    lines = ["python -m gpu_check.stage_kernels: build csrc/ for this GPU's arch (melama_mcore.kernels), self-check",
             "python -m pytest -q " + " ".join(TESTS) + "  (each kernel vs a float64 formula)",
             "python benchmarks/kernels.py " + " ".join(BANDWIDTH) + " --json ...  (70B shapes, bf16)"]
    if mode.smoke:
        lines = [lines[1] + "  (on CPU: finds the tests, all skip)",
                 "skipped on CPU: the build and the bandwidth (no CUDA device)"]
    return lines


STAGE = Stage("b", "csrc kernels", 110, run, plan)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="build the kernels for this GPU, self-check, write JSON")
    parser.add_argument("--json", required=True)
    path = parser.parse_args().json
    with open(path, "w") as f:
        json.dump(build_probe(), f, indent=1)
    sys.exit(0)
