"""Stages, their budgets and what each records.

A stage is a function of a `Context`: it starts jobs (jobs.py) that get the rest of the stage's
budget as their timeout, and records parts (ok / failed / skipped with a reason), metrics and a one-
line summary. When a job outlives the budget it is killed and the stage is recorded as `timeout`;
a failing job or check records the stage as `failed`; either way the next stage starts. The driver
itself never imports torch (a CUDA context in it would outlive every job), so a stage's own code is
bookkeeping: the work is in its jobs.
"""

from __future__ import annotations

import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gpu_check.jobs import JobResult

ROOT = Path(__file__).resolve().parents[2]  # the repository
OVERRUN_GRACE_S = 5.0  # a stage whose own bookkeeping ends this long after its budget is a timeout too
LOG_TAIL_BYTES = 48 * 1024  # of each job's output kept in gpu_check.log (the file must come back whole)


@dataclass(frozen=True)
class Mode:
    smoke: bool  # --cpu-smoke: toy sizes on CPU, GPU-only parts skipped with their reason

    @property
    def label(self) -> str:
        return "cpu-smoke" if self.smoke else "gpu"


@dataclass(frozen=True)
class Stage:
    key: str  # a, b, ...
    title: str
    budget_s: float  # on a GPU; --cpu-smoke gives every stage the same ceiling (__main__.py)
    run: Callable[["Context"], None]
    plan: Callable[[Mode], list[str]]  # what the stage will run, for --dry-run


class BudgetExceeded(Exception):
    """A job was killed, or would start, after the stage's budget."""


class StageError(Exception):
    """The stage cannot go on; the message says why (a job failed, a result is missing)."""


@dataclass
class Record:
    key: str
    title: str
    budget_s: float
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    elapsed_s: float = 0.0
    summary: str = ""
    error: str | None = None
    parts: dict[str, dict] = field(default_factory=dict)  # name -> {"status", "detail"}
    metrics: dict = field(default_factory=dict)
    jobs: list[dict] = field(default_factory=list)

    def settled_status(self) -> str:
        """The stage's status from its parts, when it ran to its end."""
        statuses = [p["status"] for p in self.parts.values()]
        if "failed" in statuses:
            return "failed"
        if not statuses or all(s == "skipped" for s in statuses):
            return "skipped"
        return "ok"

    def to_dict(self) -> dict:
        return dict(vars(self))


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a job's output (its `error: ...`, or an exception's last line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else "(no output)"


class Context:
    """What a stage works with: its budget, its folder, the jobs it starts, what it records."""

    def __init__(self, stage: Stage, mode: Mode, launcher, work: Path, shared: Path, log: Path,
                 env: dict[str, str], facts: dict, budget_s: float):
        self.stage, self.mode, self.launcher = stage, mode, launcher
        self.work = work / stage.key  # this stage's files
        self.shared = shared  # files stages share (the synthetic corpus, the tokenizer)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log, self.env, self.facts = log, env, facts  # env and facts: shared by every stage of the run
        self.record = Record(stage.key, stage.title, budget_s)
        self.deadline = time.monotonic() + budget_s

    @property
    def cuda(self) -> bool:
        """Whether stage a found a CUDA device (assumed in a GPU run when it could not tell)."""
        found = self.facts.get("cuda")
        return (not self.mode.smoke) if found is None else bool(found)

    def lacks_gpu(self, what: str) -> bool:
        """A GPU run on a machine without CUDA: record `what` as skipped, say so (--cpu-smoke never lacks it)."""
        if self.mode.smoke or self.cuda:
            return False
        self.skip(what, "no CUDA device (on a CPU machine: run.sh --cpu-smoke)")
        return True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def job(self, label: str, target: str | Path, args: list, *, env: dict[str, str] | None = None,
            cwd: Path | None = None, check: bool = True) -> JobResult:
        """Run `python -m target args` (or a script) within the stage's budget. A timeout raises
        BudgetExceeded; with `check`, a non-zero exit raises StageError with its last output line."""
        left = self.remaining()
        target, args = str(target), [str(a) for a in args]
        if left <= 0:
            raise BudgetExceeded(f"no time left for {label}")
        log = self.work / f"{label}.log"
        log.unlink(missing_ok=True)
        result = self.launcher.run(target, args, {**self.env, **(env or {})}, left, log, cwd)
        self.record.jobs.append({"label": label, "command": shlex.join([target, *args]),
                                 "returncode": result.returncode, "seconds": round(result.seconds, 2)})
        self._append_log(label, target, args, result)
        if result.timed_out:
            raise BudgetExceeded(f"{label} was still running when the {self.record.budget_s:.0f} s budget ran out "
                                 f"(killed after {result.seconds:.0f} s)")
        if check and result.returncode != 0:
            raise StageError(f"{label} failed (exit {result.returncode}): {last_line(result.output())}")
        return result

    def part(self, name: str, ok: bool, detail: str = "") -> bool:
        self.record.parts[name] = {"status": "ok" if ok else "failed", "detail": detail}
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.record.parts[name] = {"status": "skipped", "detail": reason}

    def _append_log(self, label: str, target: str, args: list[str], result: JobResult) -> None:
        text = result.output()
        if len(text) > LOG_TAIL_BYTES:
            text = f"[... {len(text) - LOG_TAIL_BYTES} characters left out ...]\n" + text[-LOG_TAIL_BYTES:]
        code = "killed at the budget" if result.timed_out else f"exit {result.returncode}"
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {self.stage.key}. {self.stage.title} / {label}: {shlex.join([target, *args])}\n"
                    f"===== {code}, {result.seconds:.1f} s\n{text}")


def run_stage(stage: Stage, ctx: Context) -> Record:
    """Run one stage to its end, its budget or its failure, and settle its record."""
    record, began = ctx.record, time.monotonic()
    try:
        stage.run(ctx)
        record.status = record.settled_status()
    except BudgetExceeded as err:
        record.status, record.error = "timeout", str(err)
    except StageError as err:
        record.status, record.error = "failed", str(err)
    except Exception as err:  # noqa: BLE001  (a bug in one stage must not stop the others)
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        with open(ctx.log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {stage.key}. {stage.title}: the stage's own code raised\n{traceback.format_exc()}")
    record.elapsed_s = round(time.monotonic() - began, 1)
    if record.status in ("ok", "skipped") and record.elapsed_s > record.budget_s + OVERRUN_GRACE_S:
        record.status, record.error = "timeout", f"finished after its {record.budget_s:.0f} s budget"
    return record
