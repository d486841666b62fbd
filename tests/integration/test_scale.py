"""Ten thousand clients at once, against every server udskit has (blocking and asyncio,
conversational and per-message), stream and seqpacket.

The clients live in a child process, so that each side holds its own 10,000 descriptors:
the child connects them all (blocking connects: a full backlog makes a client wait, it is
never refused), sends one message on each, reads every answer, and reports. The test then
stops the server with all 10,000 connections still open and checks that the stop is prompt,
that every client sees its connection end, and that nothing is left behind: descriptors,
threads, the socket file. Memory is checked per client, against what the modules promise.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import Channel, ConnectionClosed
from udskit.server import SHUTDOWN_GRACE

from ..conftest import READY_TIMEOUT, open_fds, stop_loop_thread

#: Clients at once.
CLIENTS = 10_000

#: Descriptors the test process needs besides the clients' (pytest, the interpreter, the
#: listener, the server's epoll and wake-up descriptors).
SPARE_FDS = 256

#: Resident memory a server may take per connected client that has sent a short message and
#: read its answer. The thread-per-client Server promises about 20 KiB a stream client (its
#: thread's stack pages, its socket object and a one-page receive buffer); the others less.
RSS_PER_CLIENT = 64 * 1024

#: Threads a server may run besides the test's own, other than one per client where it
#: promises that (the thread-per-client Server).
EXTRA_THREADS = 4

#: How long stop() may take with every client connected. The handlers all see their
#: connection end at once, and stop() waits SHUTDOWN_GRACE for them in all (1 to 2 s for
#: the thread-per-client Server, measured; 6 s on a machine busy with other tests): a bound
#: that catches a stop waiting for each handler in turn, not a measure of its speed.
STOP_WITHIN = SHUTDOWN_GRACE + READY_TIMEOUT

#: How long the clients wait for their answers, and the test for everything: ten thousand
#: handler threads taking turns at the GIL on a shared CI machine are slow, not stuck.
ANSWER_WITHIN = 40.0

#: The client side: CLIENTS connections, one message and its answer on each, then (on "end")
#: how many connections the server ended. Reports one JSON line per step.
CLIENT = r"""
import json, os, resource, select, socket, struct, sys, time

path, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
stream = kind == "stream"
socks, refused = [], []
for number in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)  # blocking: waits while the backlog is full
    except OSError as exc:
        refused.append(f"{number}: {exc}")
        sock.close()
        continue
    socks.append(sock)
print(json.dumps({"connected": len(socks), "refused": refused[:5]}), flush=True)
sys.stdin.readline()

def frame(number):
    message = b"client %d" % number
    return struct.pack(">I", len(message)) + message if stream else message

epoll = select.epoll()
waiting = {}
for number, sock in enumerate(socks):
    sock.setblocking(False)
    sock.send(frame(number))
    waiting[sock.fileno()] = (sock, frame(number), bytearray())
    epoll.register(sock.fileno(), select.EPOLLIN)
answered = wrong = ended = 0
deadline = time.monotonic() + float(sys.argv[4])
while waiting and time.monotonic() < deadline:
    for fd, _ in epoll.poll(1.0):
        sock, expected, got = waiting[fd]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            got += data
            if len(got) < len(expected):
                continue
        if not data:
            ended += 1
        elif bytes(got) == expected:
            answered += 1
        else:
            wrong += 1
        epoll.unregister(fd)
        del waiting[fd]
report = {"answered": answered, "wrong": wrong, "ended": ended, "silent": len(waiting)}
print(json.dumps(report), flush=True)
sys.stdin.readline()
# The server has stopped: every connection must read its end now.
for sock in socks:
    sock.setblocking(True)
    sock.settimeout(float(sys.argv[4]))
closed = 0
for sock in socks:
    try:
        closed += sock.recv(1) == b""
    except OSError:
        closed += 1  # reset: ended too
print(json.dumps({"closed": closed}), flush=True)
"""

SERVERS = ["Server", "MessageServer", "aio.Server", "aio.MessageServer"]


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room for CLIENTS descriptors in this process (and its children), within the hard
    limit; restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CLIENTS + SPARE_FDS
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(
            f"needs {wanted} descriptors per process for {CLIENTS} clients; "
            f"RLIMIT_NOFILE's hard limit is {hard}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _status(field: str) -> int:
    """A number from /proc/self/status (VmRSS in KiB, Threads)."""
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise AssertionError(f"no {field} in /proc/self/status")


def echo(channel: Channel) -> None:
    for message in channel:
        channel.send(message)


async def aecho(channel: udskit.aio.Channel) -> None:
    while True:
        try:
            message = await channel.recv()
        except ConnectionClosed:
            return
        await channel.send(message)


@contextmanager
def running(
    which: str, path: Path, kind: str
) -> Iterator[tuple[Any, Callable[[], None], threading.Thread]]:
    """The server ``which`` serving ``path`` in a thread; yields it, a stop() callable from
    this thread, and that thread."""
    options: dict[str, Any] = {"type": kind, "backlog": 4096}
    if not which.startswith("aio."):
        server: Any = (
            udskit.Server(path, echo, **options)
            if which == "Server"
            else udskit.MessageServer(path, lambda conn, message: message, **options)
        )
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield server, server.stop, thread
        finally:
            server.close()
            thread.join(READY_TIMEOUT)
        return
    loop = asyncio.new_event_loop()

    async def start() -> Any:
        if which == "aio.Server":
            return await udskit.aio.start_server(path, aecho, **options)
        return await udskit.aio.start_message_server(path, lambda conn, message: message, **options)

    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve_forever(),))
    thread.start()
    try:
        yield server, lambda: loop.call_soon_threadsafe(server.stop), thread
    finally:
        stop_loop_thread(loop, thread)


def _report(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"the client process ended early (exit {child.wait(READY_TIMEOUT)})"
    result: dict[str, Any] = json.loads(line)
    return result


def _tell(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


@pytest.mark.long
@pytest.mark.timeout(ANSWER_WITHIN + 60)
@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("which", SERVERS)
def test_ten_thousand_clients_at_once(
    sockdir: Path, which: str, kind: str, descriptors: None
) -> None:
    path = sockdir / "s.sock"
    fds_before = open_fds()
    threads_before = _status("Threads")
    with running(which, path, kind) as (server, stop, thread):
        rss_before = _status("VmRSS")
        with subprocess.Popen(
            [sys.executable, "-c", CLIENT, os.fspath(path), kind, str(CLIENTS), str(ANSWER_WITHIN)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                connected = _report(child)
                assert connected == {"connected": CLIENTS, "refused": []}
                _tell(child)
                answers = _report(child)
                assert answers == {"answered": CLIENTS, "wrong": 0, "ended": 0, "silent": 0}
                assert server.active_clients == CLIENTS
                per_client = (_status("VmRSS") - rss_before) * 1024 / CLIENTS
                assert per_client < RSS_PER_CLIENT, (
                    f"{which} ({kind}) holds {per_client / 1024:.0f} KiB per client"
                )
                threads = _status("Threads") - threads_before
                promised = CLIENTS if which == "Server" else 0
                assert threads <= promised + EXTRA_THREADS, f"{which} runs {threads} threads"
                stop()
                thread.join(STOP_WITHIN)
                assert not thread.is_alive(), f"stop() did not end with {CLIENTS} clients"
                _tell(child)
                assert _report(child) == {"closed": CLIENTS}
            finally:
                child.kill()  # ends only if a step above failed: it exits by itself
    assert not path.exists()
    leaked = {fd for fd in open_fds() - fds_before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors left open: {len(leaked)}"
    # A handler thread leaves the server's books just before it ends: give the last ones
    # a moment to be gone (a bounded wait, polling /proc).
    deadline = time.monotonic() + READY_TIMEOUT
    while _status("Threads") > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _status("Threads") <= threads_before


#: Clients in the test of a low open-file limit: several times the room it leaves.
FEW_CLIENTS = 300


@pytest.mark.parametrize("which", SERVERS)
def test_a_server_raises_a_low_open_file_limit_to_hold_its_clients(
    sockdir: Path, which: str
) -> None:
    # Under the soft limit of 1,024 that a login shell or a systemd service starts with,
    # a server held about a thousand clients and kept the rest waiting in the backlog.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(open_fds()) + 64
    if hard != resource.RLIM_INFINITY and hard < low + FEW_CLIENTS + SPARE_FDS:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}")
    path = sockdir / "s.sock"
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with running(which, path, "stream") as (_, stop, thread):
            args = [os.fspath(path), "stream", str(FEW_CLIENTS), str(ANSWER_WITHIN)]
            with subprocess.Popen(  # the clients raise their own limit
                [sys.executable, "-c", CLIENT, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as child:
                try:
                    assert _report(child) == {"connected": FEW_CLIENTS, "refused": []}
                    _tell(child)
                    answers = _report(child)
                    assert answers == {"answered": FEW_CLIENTS, "wrong": 0, "ended": 0, "silent": 0}
                    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
                    stop()
                    thread.join(STOP_WITHIN)
                    _tell(child)
                    assert _report(child) == {"closed": FEW_CLIENTS}
                finally:
                    child.kill()  # ends only if a step above failed: it exits by itself
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
