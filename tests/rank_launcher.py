"""Start a test job's ranks cheaply: each rank gets the variables torchrun gives its workers (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs the module or script as
`python -m` / `python` would (`runpy`, `__main__`, `sys.argv`), but is forked from one interpreter
that has already imported the trainer, instead of a fresh one per rank behind a torchrun agent.

Why: importing torch and megatron-core takes about 5 s of CPU per process, torchrun's agent 2 s
more; a tiny test run trains in a few seconds. On CI's 2 cores that start-up was most of the suite.
What this leaves out is torchrun's agent itself (its process groups, signal forwarding, restarts,
ChildFailedError report): test_launch, test_fault_tolerance and test_user_errors launch torchrun.

Like torchrun, a job whose rank failed does not wait for the others forever: they get
`FAILURE_GRACE_S` to exit on their own (a config error stops every rank at once), then are killed.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import time
import warnings
from pathlib import Path

from melama_mcore.distributed.launch import free_local_port

PRELOAD = ["melama_mcore.train"]
FAILURE_GRACE_S = 10.0
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank(target: str, argv: list[str], env: dict[str, str], log_path: str, cwd: str | None) -> None:
    """Runs in the forked rank: become `python -m target argv` (or `python target argv`) with `env`."""
    if cwd is not None:
        os.chdir(cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    # What a fresh interpreter would have read from the environment at start-up.
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [target, *argv]
    if target.endswith(".py"):
        sys.path.insert(0, str(Path(target).parent))
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


def run_ranks(nproc: int, target: str, argv: list[str], env: dict[str, str], *, timeout: float,
              log_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the job to its end; every rank's output goes to `log_path` (appended) and comes back as
    `.stdout`. The return code is the first non-zero rank exit code (a signal as -N), else 0."""
    ctx, port = _forkserver(), free_local_port()
    procs = []
    for rank in range(nproc):
        rank_env = {k: v for k, v in env.items() if k != "TORCHELASTIC_RUN_ID"}
        rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = (target, list(argv), rank_env, str(log_path), None if cwd is None else str(cwd))
        proc = ctx.Process(target=_rank, args=args, name=f"rank{rank}")
        proc.start()
        procs.append(proc)
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now > deadline:
                raise subprocess.TimeoutExpired([target, *argv], timeout, output=_read(log_path))
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > FAILURE_GRACE_S:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    return subprocess.CompletedProcess([target, *argv], next((c for c in codes if c != 0), 0), _read(log_path))


def _read(path: Path) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""
