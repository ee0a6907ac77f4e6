"""Launchers as users run them: ranks die with their torchrun agent (issue 14, item 6), and
examples/pretrain_70b.sh runs as two nodes on one machine (issue 11)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melama_mcore.distributed.launch import free_local_port
from trunk_fixtures import TINY, data_overrides, losses, step_records, train_command

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    # The launcher scripts call `torchrun`: the one of this interpreter, as in an activated environment.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=path, **extra)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None once the process is
    gone. A zombie counts as gone: it holds no memory, and an orphan's reaper may never collect it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in "ZX" else fields


def _alive(pid: int) -> bool:
    return _stat(pid) is not None


def _idle(pid: int, seconds: float = 1.0) -> bool:
    """Used (almost) no CPU time over `seconds` (utime + stime, in clock ticks)."""
    def ticks() -> int:
        fields = _stat(pid)
        return int(fields[11]) + int(fields[12])

    before = ticks()
    time.sleep(seconds)
    return ticks() - before <= 2


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        out.append(todo.pop())
        todo.extend(_children(out[-1]))
    return out


def _rank_of(pid: int) -> int | None:
    """RANK from a process's environment (None: not a rank)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")), None)


def _wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:.0f} s"
        assert proc is None or proc.poll() is None, f"{what}: the job ended first (exit {proc.returncode})"
        time.sleep(0.1)
    return time.monotonic() - start


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ranks_exit_when_torchrun_is_killed(tiny_data, tmp_path):
    """kill -9 of torchrun's whole process group (the ranks are in sessions of their own, so it does
    not reach them) while rank 1 is stopped and rank 0 therefore blocked inside a collective: rank 0
    exits within seconds, and so does rank 1 once it runs again; nothing of the job is left."""
    out, log_path = tmp_path / "out", tmp_path / "job.log"
    # Long enough that, left alone, the ranks would train (or wait on each other) for many minutes.
    args = [f"output_dir={out}", *TINY, *data_overrides(tiny_data), "training.train_iters=100000"]
    job, ranks = [], {}
    with open(log_path, "w") as log:
        agent = subprocess.Popen(train_command(2, args), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                 start_new_session=True)
        try:
            _wait_until(lambda: (out / "metrics.jsonl").exists() and step_records(out), 240,
                        "the job never logged a step", agent)
            job = _descendants(agent.pid)
            ranks = {rank: pid for pid in _children(agent.pid) if (rank := _rank_of(pid)) is not None}
            assert sorted(ranks) == [0, 1], f"torchrun's children: {ranks}"
            assert all(os.getpgid(pid) != agent.pid for pid in ranks.values()), \
                "the ranks share torchrun's process group: killing it would prove nothing"
            os.kill(ranks[1], signal.SIGSTOP)
            # Rank 0 finishes what it can alone, then waits in a collective for rank 1: its CPU time stops.
            _wait_until(lambda: _idle(ranks[0]), 60, "rank 0 never blocked without rank 1")

            os.killpg(agent.pid, signal.SIGKILL)  # torchrun's agent and its whole process group
            agent.wait()
            _wait_until(lambda: not _alive(ranks[0]), 15, "rank 0, blocked in a collective, outlived torchrun")
            assert _alive(ranks[1]), "rank 1 should still be stopped (else the next check proves nothing)"
            os.kill(ranks[1], signal.SIGCONT)
            _wait_until(lambda: not _alive(ranks[1]), 15, "rank 1 outlived torchrun")
            # Nothing the ranks started outlives them.
            _wait_until(lambda: not any(map(_alive, job)), 10, "a process of the job outlived its rank")
        finally:
            _kill_all([*job, *ranks.values()])
    output = log_path.read_text()
    assert f"rank 0: exiting, its launcher (torchrun, pid {agent.pid}) is gone" in output, output[-3000:]


def test_a_rank_orphaned_before_its_watch_starts_exits_at_once():
    """The agent can die between start-up (where its pid is read) and the process groups (where the
    watch starts): the watch then sees another parent at its first look."""
    script = ("import os, time\n"
              "from melama_mcore.distributed.watchdog import exit_with_parent\n"
              "exit_with_parent(os.getppid() + 100000, 'rank 0: exiting, its launcher is gone', exit_code=7)\n"
              "time.sleep(60)\n")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert (run.returncode, run.stderr.strip()) == (7, "rank 0: exiting, its launcher is gone")
    assert time.monotonic() - started < 30  # the interpreter's start-up, not the 60 s sleep


def test_pretrain_70b_script_runs_as_two_nodes_on_one_machine(tiny_data, tmp_path):
    """The multi-node launcher users run, once per "node", both on this machine: 2 nodes x 1 process,
    the tiny CPU recipe (TP 2, so the two nodes hold one model between them), a few steps."""
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", "training.train_iters=3", "training.seq_length=32", "logging.log_interval=1",
                 "logging.tensorboard=false", *data_overrides(tiny_data)]
    env = _env(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()),
               CONFIG="examples/configs/tiny_cpu.yaml")
    env.pop("WORLD_SIZE", None)
    nodes, logs = [], [tmp_path / f"node{rank}.log" for rank in range(2)]
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:  # from another directory: the script finds the repository itself
                nodes.append(subprocess.Popen(["bash", str(REPO / "examples" / "pretrain_70b.sh"), *overrides],
                                              cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                              env=dict(env, NODE_RANK=str(rank)), start_new_session=True))
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert codes == [0, 0], "\n".join(f"node {r}:\n{log.read_text()[-3000:]}" for r, log in enumerate(logs))
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3] and all(map(math.isfinite, steps.values())), steps
    assert "world 2 = TP 2 x PP 1 x DP 1" in logs[0].read_text()
