"""Every server out of descriptors at accept(2), for real: a server process whose open-file
limit leaves room for a handful of clients, and more clients than that.

It must say so once, in a line that says what to do (not once per retry: a server out of
descriptors for an hour would log thousands), go on serving the clients it has, not spin,
and take the waiting clients once descriptors are free again, saying so once.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

import udskit

from ..conftest import READY_TIMEOUT, cpu_used

#: The server program: ``which`` serves argv[2] with an echo handler; once it is set up,
#: its descriptor limit (soft and hard) leaves room for argv[3] more; SIGTERM stops it.
#: Logs to stderr.
SERVER = """
import asyncio, logging, os, resource, signal, sys
import udskit, udskit.aio

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
which, path, room = sys.argv[1], sys.argv[2], int(sys.argv[3])

def limit():
    open_now = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    # The hard limit too: below it, the server would raise its soft limit, and go on.
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + room, open_now + room))
    print("ready", flush=True)

def echo(channel):
    for message in channel:
        channel.send(message)

async def aecho(channel):
    while True:
        try:
            message = await channel.recv()
        except udskit.ConnectionClosed:
            return
        await channel.send(message)

if which in ("Server", "MessageServer"):
    if which == "Server":
        server = udskit.Server(path, echo)
    else:
        server = udskit.MessageServer(path, lambda conn, message: message)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    limit()
    server.serve_forever()
else:
    async def main():
        if which == "aio.Server":
            server = await udskit.aio.start_server(path, aecho)
        else:
            server = await udskit.aio.start_message_server(path, lambda conn, message: message)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
        limit()
        await server.serve_forever()
    asyncio.run(main())
"""

#: Clients the server has room for (about: a server may hold a descriptor or two more or
#: less), and clients beyond those, waiting in its backlog: no more than the clients that
#: make room for them by leaving.
ROOM = 5
WAITING = 3

#: The window in which the exhausted server is watched: backing off, it looks a handful of
#: times (and used to log each one); spinning, it would use the whole window.
WINDOW = 1.0
CPU_ALLOWED = 0.2


def _read_line(stream: IO[str]) -> str:
    ready, _, _ = select.select([stream], [], [], READY_TIMEOUT)
    assert ready, f"no output from the server within {READY_TIMEOUT} s"
    return stream.readline()


def _round_trip(client: udskit.Channel, message: bytes) -> bytes:
    client.send(message)
    return client.recv()


@pytest.mark.parametrize("which", ["Server", "MessageServer", "aio.Server", "aio.MessageServer"])
def test_out_of_descriptors_is_said_once_and_recovers(sockdir: Path, which: str) -> None:
    path = sockdir / "s.sock"
    with subprocess.Popen(
        [sys.executable, "-c", SERVER, which, os.fspath(path), str(ROOM)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        clients: list[udskit.Channel] = []
        try:
            assert _read_line(proc.stdout) == "ready\n"
            clients.extend(
                udskit.connect(path, timeout=READY_TIMEOUT) for _ in range(ROOM + WAITING)
            )
            first = _read_line(proc.stderr)
            assert first.startswith("WARNING ")
            assert "accept failed (Too many open files)" in first
            assert "ulimit -n" in first
            used = cpu_used(proc.pid, WINDOW)
            assert used < CPU_ALLOWED, f"the server used {used:.2f} s of CPU in {WINDOW} s"
            # Out of descriptors, it still serves the clients it has.
            assert _round_trip(clients[0], b"held") == b"held"
            # Descriptors come back as clients leave: the waiting ones are served.
            for client in clients[:ROOM]:
                client.close()
            for number, client in enumerate(clients[ROOM:]):
                assert _round_trip(client, b"waited %d" % number) == b"waited %d" % number
        finally:
            for client in clients:
                client.close()
            proc.send_signal(signal.SIGTERM)
            _, rest = proc.communicate(timeout=READY_TIMEOUT)
    assert proc.returncode == 0, rest
    # One line as a run of failures begins, one as it ends: never one per try. Clients
    # leaving may end a run, and the next accept begin another (accept(2) fails with EMFILE
    # as the last descriptor goes, queue empty or not), which is said again.
    said = [
        "failed" if "accept failed" in line else "again"
        for line in [first, *rest.splitlines()]
        if "accept failed" in line or "accepting again" in line
    ]
    assert said[: len(said) // 2 * 2] == ["failed", "again"] * (len(said) // 2), rest
    assert "again" in said, rest
    assert not path.exists()
