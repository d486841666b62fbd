"""A server out of descriptors when a successor asks for its listener: the handover thread
cannot accept the request. It must not spin (the request stays queued, so the control socket
stays readable) nor log a line per try; once descriptors are free, the handover goes ahead.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import udskit

from ..conftest import cpu_used
from .harness import PATIENCE, control_path

#: The server program: a MessageServer with handover on argv[1], answering "PID:message";
#: once set up, its descriptor limit leaves room for argv[2] more; SIGTERM stops it.
SERVER = """
import logging, os, resource, signal, sys, threading, time
import udskit
from udskit.handover import control_address

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
path, room = sys.argv[1], int(sys.argv[2])
pid = b"%d" % os.getpid()
server = udskit.MessageServer(path, lambda conn, message: pid + b":" + message, handover=True)
signal.signal(signal.SIGTERM, lambda *_: server.stop())
serving = threading.Thread(target=server.serve_forever)
serving.start()
control = os.fsdecode(control_address(server.listener.address).path)
deadline = time.monotonic() + 20
while not os.path.exists(control):  # the handover is offered once it serves
    assert time.monotonic() < deadline, "no handover socket"
    time.sleep(0.01)
open_now = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
# The hard limit too: below it, the server would raise its soft limit, and go on.
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + room, open_now + room))
print("ready", flush=True)
serving.join()
print("returned", flush=True)
"""

#: Descriptors the server has room for once it serves: clients take them all.
ROOM = 3

#: The window in which the exhausted server is watched with a successor's request queued.
WINDOW = 1.0
CPU_ALLOWED = 0.2


def _start(path: Path, log: int, room: int = ROOM) -> subprocess.Popen[str]:
    """The server program, its stderr to ``log`` (a file: a flood of lines must not block
    it on a full pipe), once it says ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, os.fspath(path), str(room)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], PATIENCE)
    assert ready, "the server did not start"
    assert proc.stdout.readline() == "ready\n"
    return proc


def _lines(log: int) -> list[str]:
    return os.pread(log, 1 << 20, 0).decode().splitlines()


def test_a_handover_request_out_of_descriptors_waits_without_spinning(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    procs: list[subprocess.Popen[str]] = []
    clients: list[udskit.Channel] = []
    with (
        tempfile.TemporaryFile(dir=sockdir) as old_log,
        tempfile.TemporaryFile(dir=sockdir) as new_log,
    ):
        try:
            old = _start(path, old_log.fileno())
            procs.append(old)
            # Clients take every descriptor the server has left; one more waits queued.
            clients.extend(udskit.connect(path, timeout=PATIENCE) for _ in range(ROOM + 1))
            clients[0].send(b"hi")
            assert clients[0].recv() == b"%d:hi" % old.pid
            deadline = time.monotonic() + PATIENCE
            while not any("accept failed" in line for line in _lines(old_log.fileno())):
                assert time.monotonic() < deadline, "the server never ran out of descriptors"
                time.sleep(0.01)  # polling its log, bounded
            # A successor's request, queued on the control socket the server cannot accept.
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as request:
                request.connect(os.fspath(control_path(path)))  # queued, not accepted
                used = cpu_used(old.pid, WINDOW)
            assert used < CPU_ALLOWED, f"the server used {used:.2f} s of CPU in {WINDOW} s"
            refused = [line for line in _lines(old_log.fileno()) if "handover socket" in line]
            assert len(refused) <= 1, f"{len(refused)} lines: {refused[:3]}"
            # Descriptors free again: a real successor takes over, and the old one ends.
            for client in clients:
                client.close()
            new = _start(path, new_log.fileno(), room=64)
            procs.append(new)
            assert old.wait(PATIENCE) == 0
            with udskit.connect(path, timeout=PATIENCE) as client:
                client.send(b"after")
                assert client.recv() == b"%d:after" % new.pid
        finally:
            for client in clients:
                client.close()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=PATIENCE)
