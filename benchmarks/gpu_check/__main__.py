"""The GPU check's driver: `run.sh` calls it (after installing the carried wheels).

    python -m gpu_check OUT_DIR                 # on a GPU machine: every stage at real sizes
    python -m gpu_check --cpu-smoke OUT_DIR     # on CPU: every stage's code path at toy sizes (CI)
    python -m gpu_check --dry-run [--cpu-smoke] # what would run, and the time each stage is allowed

Writes OUT_DIR/gpu_check.md, gpu_check.json and gpu_check.log (every job's output), nothing else:
the stages' files go to --work (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_check import jobs, report, stage_env, stage_eval, stage_kernels, stage_lora, stage_slice, stage_trunk
from gpu_check.runner import ROOT, Context, Mode, Stage, run_stage

STAGES: list[Stage] = [stage_env.STAGE, stage_kernels.STAGE, stage_trunk.STAGE, stage_slice.STAGE, stage_lora.STAGE,
                       stage_eval.STAGE]
SMOKE_BUDGET_S = 240.0  # per stage in --cpu-smoke: a ceiling against hangs in CI, not a target
# Every job runs offline and unbuffered; the kernel cache lives in the work folder (built once, stage b).
JOB_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def budget(stage: Stage, mode: Mode) -> float:
    return SMOKE_BUDGET_S if mode.smoke else stage.budget_s


def listing(stages: list[Stage], mode: Mode, launcher: str) -> str:
    total = sum(budget(s, mode) for s in stages)
    head = ("CPU smoke (toy sizes; GPU-only parts skipped with their reason)" if mode.smoke
            else "GPU run (real sizes), after run.sh installs .whl/")
    lines = [f"gpu_check, {head}: {len(stages)} stages, {total:.0f} s allowed in all; jobs start by {launcher}",
             f"{'stage':<26}{'budget':>8}  what it runs"]
    for s in stages:
        plan = s.plan(mode)
        lines.append(f"{s.key}. {s.title:<23}{budget(s, mode):>6.0f} s  {plan[0]}")
        lines += [f"{'':<36}{line}" for line in plan[1:]]
    lines.append("writes OUT_DIR/gpu_check.md (the device line, one table), gpu_check.json, gpu_check.log")
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GPU_CHECK_COMMIT", "unknown")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.sh", description="One prepared check of everything GPU-only: environment, "
                                "csrc kernels, the bf16 trunk with NCCL, a 70B-shaped slice, LoRA on a 13B-shaped "
                                "slice, evaluation. Each stage has a time budget; a stage that fails or overruns is "
                                "recorded and the next one starts.")
    p.add_argument("out_dir", nargs="?", type=Path, help="where gpu_check.md/.json/.log go (a new or empty folder)")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: every stage's code path (what CI runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the stages, their budgets and what they run; run nothing")
    p.add_argument("--stages", default="".join(s.key for s in STAGES),
                   help="which stages, e.g. bde (default: all, in order)")
    p.add_argument("--work", type=Path, help="the stages' files (default: a new temporary folder)")
    p.add_argument("--launch", choices=list(jobs.LAUNCHERS),
                   help="how jobs start: subprocess (default on GPU) or forkserver (default for --cpu-smoke)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = Mode(smoke=args.cpu_smoke)
    launch = args.launch or ("forkserver" if mode.smoke else "subprocess")
    unknown = set(args.stages) - {s.key for s in STAGES}
    if unknown:
        print(f"error: --stages {args.stages}: no stage {', '.join(sorted(unknown))} (stages: "
              f"{''.join(s.key for s in STAGES)})", file=sys.stderr)
        return 2
    stages = [s for s in STAGES if s.key in args.stages]
    if args.dry_run:
        print(listing(stages, mode, launch))
        return 0
    if args.out_dir is None:
        print("error: give OUT_DIR (or --dry-run)", file=sys.stderr)
        return 2
    out = args.out_dir
    if (out / report.JSON_NAME).exists():
        print(f"error: {out} already holds {report.JSON_NAME}: choose a new OUT_DIR or delete it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    shared = work / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    os.environ.update(JOB_ENV)  # before a forkserver imports anything that reads them at import time
    env = {**os.environ, "MELAMA_KERNELS_CACHE": str(work / "kernel_cache")}
    launcher = jobs.LAUNCHERS[launch]()
    log = out / report.LOG_NAME
    log.write_text(listing(stages, mode, launch) + "\n")
    state: dict = {"gpu_check": 1, "complete": False, "mode": mode.label,
                   "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "commit": commit(), "command": " ".join(["run.sh", *(argv if argv is not None else sys.argv[1:])]),
                   "budget_s": sum(budget(s, mode) for s in stages), "install": os.environ.get("GPU_CHECK_INSTALL"),
                   "launcher": launch, "work": str(work), "device": None, "stages": []}
    facts: dict = {}
    for stage in stages:
        print(f"gpu_check: {stage.key}. {stage.title} ({budget(stage, mode):.0f} s allowed)", flush=True)
        ctx = Context(stage, mode, launcher, work, shared, log, env, facts, budget(stage, mode))
        record = run_stage(stage, ctx)
        state["stages"].append(record.to_dict())
        state["device"] = facts.get("device")
        report.write(out, state)
        print(f"gpu_check: {stage.key}. {record.status} in {record.elapsed_s:.0f} s"
              + (f": {record.error}" if record.error else ""), flush=True)
    state["complete"] = True
    report.write(out, state)
    print(report.markdown(state))
    accepted = ("ok", "skipped") if mode.smoke else ("ok",)  # on a GPU nothing may be skipped
    return 0 if all(s["status"] in accepted for s in state["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
