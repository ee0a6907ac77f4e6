"""A `melama` for tests that run many documented commands: each call is forked from one warm
interpreter that has already imported torch, megatron-core and every subcommand, instead of paying
that import (about 4 s of CPU) again per call.

    python melama_shim.py serve SOCKET      # the warm interpreter (a test fixture starts it)
    python melama_shim.py SOCKET ARGS...    # what the `melama` on the test's PATH runs

The client sends its arguments, working directory, environment and its stdin/stdout/stderr (the file
descriptors themselves), and exits with the command's exit status. The forked child runs
`melama_mcore.cli.main` as a fresh `melama` process would, at-exit handlers included; the server
itself never runs a command, so no state passes from one command to the next. Only the server's
start-up environment is read at import time: start it with the environment the commands get.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("i")


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def serve(path: str) -> None:
    import importlib

    from melama_mcore.cli import SUBCOMMANDS

    for module, _ in SUBCOMMANDS.values():
        importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    server = socket.socket(socket.AF_UNIX)
    server.bind(path + ".bind")
    server.listen()
    os.rename(path + ".bind", path)  # the socket appears once it accepts: clients never race the start
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            _child(conn)
        conn.close()


def _child(conn: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command waits for its own children
    code = 1
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        request = json.loads(_receive(conn, HEADER.unpack(header)[0]))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["melama", *request["argv"]]
        from melama_mcore.cli import main

        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # what an uncaught exception does to a fresh process
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(HEADER.pack(code))
        os._exit(code)


def client(path: str, argv: list[str]) -> int:
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        socket.send_fds(conn, [HEADER.pack(len(body))], [0, 1, 2])
        conn.sendall(body)
        reply = _receive(conn, HEADER.size)
    if len(reply) != HEADER.size:
        print("melama (test shim): the command died without an exit status", file=sys.stderr)
        return 1
    return HEADER.unpack(reply)[0]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
