"""How the check starts its jobs (a probe, `melama train`, a benchmark script, pytest): each in a
process of its own, its output in a log file, killed with everything it started when its time is up.

Two ways, one interface (`Launcher.run`):
* `SubprocessLauncher`: a fresh interpreter per job. The GPU run uses it: no job can inherit a CUDA
  runtime that some import started in a parent (CUDA does not survive a fork), nothing one job does to
  CUDA or NCCL reaches the next, and a few seconds of start-up are small next to the work.
* `ForkLauncher`: jobs forked from a server that has already imported torch, megatron-core, the
  trainer and lm-eval (multiprocessing's forkserver). `--cpu-smoke` uses it: in CI, on 2 cores,
  those imports cost 5-15 s per process and the smoke starts about twenty jobs.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of a job that ran out of time
# What ForkLauncher's server imports once; every job forked from it starts with these loaded.
PRELOAD = ["melama_mcore.train", "melama_mcore.eval.command", "lm_eval.evaluator", "lm_eval.models.huggingface"]


@dataclass
class JobResult:
    returncode: int | None  # None: killed when its time was up
    seconds: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def command_line(target: str, args: list[str]) -> list[str]:
    """`python -m target args`, or `python target args` for a script path."""
    return [sys.executable, target, *args] if target.endswith(".py") else [sys.executable, "-m", target, *args]


def _kill_group(pid: int, still_running) -> None:
    """SIGTERM to the job's process group (it leads its own session), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + (wait or 0)
        while wait and time.monotonic() < end and still_running():
            time.sleep(0.05)
        if not still_running():
            return


class SubprocessLauncher:
    name = "subprocess"

    def run(self, target: str, args: list[str], env: dict[str, str], timeout: float, log: Path,
            cwd: Path | None = None) -> JobResult:
        began = time.monotonic()
        with open(log, "ab") as out:
            proc = subprocess.Popen(command_line(target, args), env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = proc.wait(timeout=max(timeout, 0.01))
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, lambda: proc.poll() is None)
                proc.wait()
                code = None
        return JobResult(code, time.monotonic() - began, log)


def _forked_job(target: str, args: list[str], env: dict[str, str], log: str, cwd: str | None) -> None:
    """Runs in the forked process: become `python -m target args` (or `python target args`)."""
    os.setsid()  # its own process group: a timeout kills whatever it started too
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if cwd:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [target, *args]
    if target.endswith(".py"):
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


class ForkLauncher:
    name = "forkserver"

    def __init__(self, preload: list[str] = PRELOAD):
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(preload)

    def run(self, target: str, args: list[str], env: dict[str, str], timeout: float, log: Path,
            cwd: Path | None = None) -> JobResult:
        began = time.monotonic()
        proc = self._context.Process(target=_forked_job, args=(target, list(args), dict(env), str(log),
                                                               None if cwd is None else str(cwd)))
        proc.start()
        proc.join(max(timeout, 0.01))
        code = proc.exitcode
        if code is None:
            _kill_group(proc.pid, proc.is_alive)
            proc.join()
        return JobResult(code, time.monotonic() - began, log)


LAUNCHERS = {"subprocess": SubprocessLauncher, "forkserver": ForkLauncher}
