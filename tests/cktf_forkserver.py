"""A ``cktf`` executable that starts in milliseconds, for tests that start many ``cktf`` processes.

Tests of shell scripts check the scripts' own work (which runs they start with which arguments, ``--resume``, the
tables they write), and tests of interruptions need a real process to signal or kill; each such process would first
spend ~5 s of CPU importing torch for its few hundred ms of training. ``python -m tests.cktf_forkserver SOCKET``
imports the package once and then, for every command a client sends, forks a process that runs the real command line
(``transfer.cli``, or ``python -m MODULE`` when the arguments start with ``-m MODULE``) with the client's arguments,
working directory, environment and standard streams; the client forwards SIGINT/SIGTERM/SIGHUP to it and exits with
its status, or dies of its signal. Each command runs in a process of its own, forked from a state where nothing but
the imports has happened, as from a shell; only what an import prints is not in its output, and every module the
server imported is already loaded (tests of either start a real interpreter). :func:`client_executable` writes the
client; the ``cktf_fast`` fixture (tests/conftest.py) runs the server for the session.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path

# The client: standard library only, started with ``python -S -E`` (no site-packages, no environment options).
CLIENT = r'''
import json, os, signal, socket, struct, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.connect(SOCKET)
request = json.dumps({"args": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(server, [struct.pack("!I", len(request)) + request], [0, 1, 2])
started = server.recv(4, socket.MSG_WAITALL)
if len(started) < 4:
    sys.exit("cktf fork server: the server did not start the command")
pid, = struct.unpack("!i", started)
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
reply = server.recv(4, socket.MSG_WAITALL)
if len(reply) < 4:
    sys.exit("cktf fork server: the server left before the command ended")
code = struct.unpack("!i", reply)[0]
if code < 0:  # die of the command's signal
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


def client_executable(path: Path, socket_path: Path) -> Path:
    """Write ``path``: an executable that runs ``cktf ARGS`` through the server listening at ``socket_path``."""
    script = path.with_suffix(".py")
    script.write_text(f"SOCKET = {str(socket_path)!r}\n{CLIENT}")
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -S -E {script} \"$@\"\n")
    path.chmod(0o755)
    return path


def _run(request: dict, fds: list[int]) -> None:
    """In the forked process: become the client's ``cktf ARGS`` and exit as it would."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    args = request["args"]
    code = 0
    try:
        if args[:1] == ["-m"]:
            sys.argv = ["-m", *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            from transfer.cli import cli

            sys.argv = ["cktf", *args]
            cli.main(args, prog_name="cktf")
    except SystemExit as stop:  # as the interpreter exits: None is 0, an int is itself, anything else is printed, 1
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by the command, as the interpreter would let it be
            pass
    os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    size = struct.unpack("!I", head)[0]
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("client left")
        body += chunk
    return json.loads(body), fds


def _closed(conn: socket.socket) -> bool:
    try:
        return not conn.recv(1)
    except OSError:
        return True


def serve(socket_path: str) -> None:
    """Import what the commands need, then fork one process per client until the parent (pytest) is gone."""
    import linear_probe.compare  # noqa: F401  (imports only: nothing here may run torch ops before forking)
    import linear_probe.stage  # noqa: F401
    import transfer.cli  # noqa: F401
    import transfer.stages.teacher  # noqa: F401
    import transfer.stages.transfer  # noqa: F401

    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    running: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready = select.select([listener, *running.values()], [], [], 0.2)[0]
        for pid, conn in list(running.items()):
            if conn in ready and _closed(conn):  # the client is gone (killed, timed out): so is its command
                os.kill(pid, signal.SIGKILL)
        if listener in ready:
            conn, _ = listener.accept()
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for other in (listener, conn, *running.values()):
                    other.close()
                _run(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!i", pid))
            running[pid] = conn
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid)
            with conn:
                try:
                    conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass  # nobody waits for it any more
    for pid in running:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])
