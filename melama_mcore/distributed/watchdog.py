"""End this process when the process that started it is gone.

A rank started by torchrun is a child of torchrun's agent, in a session of its own (the agent starts
each rank with start_new_session), so neither `kill -9` of the agent nor of the agent's process group
reaches it. Orphaned, the ranks run on, or sit blocked in a collective until the process-group
timeout (30 minutes), holding host memory and, on a GPU node, the GPUs the rerun needs.

The check is a daemon thread polling getppid(): when the parent dies the kernel re-parents the orphan
(to init or a subreaper), so the parent pid changes. The thread ends the process with os._exit, which
works while the main thread is blocked inside a C++ collective (the collectives release the GIL); a
Python signal handler would run only once the main thread returns to the interpreter, and SIGTERM
already means "save a checkpoint and stop", which cannot succeed without the launcher. torch's own
DataLoader workers watch their parent the same way.

Why not prctl(PR_SET_PDEATHSIG), as the preprocess workers use (data/preprocess.py)? There the
pool is forked by the thread that runs preprocess and lives exactly as long as it, and an immediate
SIGKILL is what is wanted. A rank can only arm it itself, after exec, and it then fires when the
agent's *thread* that forked the rank exits, not the agent: correct only while torchrun happens to
start ranks from its main thread (2.13 does; a wrapper between agent and rank breaks it either way).
Its SIGKILL also leaves no word of why the rank died. The watchdog needs no assumption about the
agent's threads and prints why.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_watching: set[int] = set()  # parent pids this process already watches


def exit_with_parent(parent_pid: int, reason: str | None = None, *, exit_code: int = 1,
                     interval_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process with `os._exit(exit_code)` once its parent is no
    longer `parent_pid` (at once if it already is not: the parent died before the watch started).
    `reason`, if given, goes to stderr first; the write is bounded, so a stderr pipe that nobody
    reads any more cannot keep the process alive. Idempotent per parent."""
    if parent_pid in _watching:
        return
    _watching.add(parent_pid)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        if reason is not None:
            say = threading.Thread(target=_write_stderr, args=(reason,), daemon=True)
            say.start()
            say.join(timeout=2.0)
        os._exit(exit_code)

    threading.Thread(target=watch, name="melama-parent-watchdog", daemon=True).start()


def _write_stderr(text: str) -> None:
    try:
        sys.stdout.flush()
        os.write(sys.stderr.fileno(), (text.rstrip("\n") + "\n").encode())
    except (OSError, ValueError):  # a closed or broken stderr: exit without the word
        pass
