"""The many-clients load generator: N concurrent clients against one echo server.

One process holds all N connections in an epoll loop. First every client connects and has
one 64-byte message echoed (untimed); the generator then says ``{"connected": N}`` and waits
for the runner's go (a line or EOF on stdin), so that the runner can sample the server's
memory with every client connected. Then each client sends a 64-byte length-prefixed
message, waits for the same bytes back, and sends the next one (one message in flight per
client), until the message cap or the time cap; then every outstanding reply is awaited. A
reply that differs from the request, a reset, an early close, or a reply that never comes is
an error; the run reports how many, and the first.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

from .contenders.frames import HEADER
from .host import FD_HEADROOM, raise_nofile
from .wire import Job, LoadResult, say_connected, say_not_measured, wait_for_go

__all__ = [
    "CONNECT_STALL_SECONDS",
    "DRAIN_PER_CLIENT_SECONDS",
    "DRAIN_SECONDS",
    "FIRST_ECHO_SECONDS",
    "drain_seconds",
    "load",
]

#: After the time cap, how long the clients wait for replies still in flight: this, plus
#: DRAIN_PER_CLIENT_SECONDS per client. A healthy server answers in milliseconds; five
#: seconds only ends a run whose server has stalled.
DRAIN_SECONDS: Final = 5.0

#: ...and a millisecond per message in flight: a server with a thread per client answers
#: 10,000 of them in turns for the GIL (one switch interval, 5 ms, at worst per turn); its
#: late replies make its rate low and its p99 long, which the table shows, not a failure.
DRAIN_PER_CLIENT_SECONDS: Final = 0.001

#: How long the clients wait for the server to accept one more of them (its backlog full)
#: before the run ends with an error. A server that accepts nobody for ten seconds while
#: clients wait has stopped accepting (a client cap, a stuck accept loop).
CONNECT_STALL_SECONDS: Final = 10.0

#: How long every client's first, untimed echo may take in all: a server that has just
#: accepted 10,000 clients may still be starting their threads or tasks.
FIRST_ECHO_SECONDS: Final = 30.0

_clock = time.perf_counter_ns


class _Client:
    __slots__ = ("have", "reply", "sent_at", "sock", "view")

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.reply = bytearray(size)
        self.view = memoryview(self.reply)
        self.have = 0
        self.sent_at = 0


# A Unix stream connect(2) to a listener whose backlog is full (Linux, net/unix/af_unix.c,
# unix_stream_connect()):
#   * a non-blocking socket fails at once with EAGAIN (not EINPROGRESS, as TCP would): there is
#     no connection in progress to wait for, and no event says when the backlog has room;
#   * a blocking socket sleeps until the server accepts, or for SO_SNDTIMEO when that is set,
#     and then fails with EAGAIN.
# The backlog is min(listen()'s argument, net.core.somaxconn), 4096 by default since Linux 5.4,
# so 10,000 clients connecting in a burst fill it whenever the server accepts more slowly than
# they connect. Python's connect() with a socket timeout connects non-blocking, and so raises
# BlockingIOError at once on a full backlog: the clients here connect blocking, bounded by
# SO_SNDTIMEO, and retry EAGAIN until the server has accepted nobody for
# CONNECT_STALL_SECONDS. EINTR is retried by Python (PEP 475); ECONNREFUSED (no listener) and
# ENOENT (no socket file) are errors.
_TIMEVAL: Final = struct.Struct("@ll")


def _connect_unix(path: str, stall_deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            left = max(0.001, stall_deadline - time.monotonic())
            seconds = int(left)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                _TIMEVAL.pack(seconds, int((left - seconds) * 1e6)),
            )
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EAGAIN:
                raise
            if time.monotonic() >= stall_deadline:
                raise TimeoutError(
                    errno.EAGAIN,
                    f"the server accepted no connection for {CONNECT_STALL_SECONDS:.0f} s "
                    "(its listen backlog stayed full)",
                ) from None
            continue  # woken early: the backlog had room, and another client took it
        return sock


def _connect(job: Job, stall_deadline: float) -> socket.socket:
    if job.option("transport", "unix") == "tcp":
        host, _, port = job.address.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = _connect_unix(job.address, stall_deadline)
    sock.setblocking(False)
    return sock


def load(job: Job, go: Callable[[], None] = wait_for_go) -> LoadResult:
    """Run the clients of ``job`` (``clients``, ``size``, ``count``, ``seconds``); ``go``
    returns when the timed part may begin (by default, at a line or EOF on stdin)."""
    problem = raise_nofile(job.clients + FD_HEADROOM)
    if problem:
        say_not_measured(f"the load generator cannot hold {job.clients} clients: {problem}")
    request = HEADER.pack(job.size) + bytes(job.size)
    clients: dict[int, _Client] = {}
    poller = select.epoll()
    try:
        for _ in range(job.clients):
            try:
                sock = _connect(job, time.monotonic() + CONNECT_STALL_SECONDS)
            except OSError as exc:
                reason = exc.strerror if isinstance(exc, TimeoutError) else str(exc)
                first = f"connected {len(clients)} of {job.clients} clients, then: {reason}"
                return LoadResult(job.clients, 0, 0.0, [], job.clients - len(clients), first)
            clients[sock.fileno()] = _Client(sock, len(request))
            poller.register(sock.fileno(), select.EPOLLIN)
        errors, first = _first_echoes(request, clients, poller)
        if errors:
            return LoadResult(job.clients, 0, 0.0, [], errors, first)
        say_connected(len(clients))
        go()
        return _run(job, request, clients, poller)
    finally:
        for client in clients.values():
            client.sock.close()
        poller.close()


def _first_echoes(
    request: bytes, clients: dict[int, _Client], poller: select.epoll
) -> tuple[int, str]:
    """Every client sends one message and gets its echo (untimed): how many clients failed,
    and the first problem ("" if none)."""
    errors: list[str] = []
    waiting = set()
    for fd, client in clients.items():
        problem = _send(client, request)
        if problem is None:
            waiting.add(fd)
        else:
            errors.append(problem)
    give_up = time.monotonic() + FIRST_ECHO_SECONDS
    while waiting:
        events = poller.poll(max(0.0, give_up - time.monotonic()))
        if not events:
            errors.append(
                f"{len(waiting)} of {len(clients)} clients had no echo of their first message "
                f"within {FIRST_ECHO_SECONDS:.0f} s"
            )
            errors += [""] * (len(waiting) - 1)
            break
        for fd, _ in events:
            client = clients[fd]
            if fd not in waiting:
                continue  # done already, or failed; nothing more is expected of it
            problem = _receive(client, request)
            if problem is not None:
                errors.append(problem)
                waiting.discard(fd)
                poller.unregister(fd)  # a closed socket would stay readable
            elif client.have == len(request):
                client.have = 0
                waiting.discard(fd)
    return len(errors), (errors[0] if errors else "")


def _run(job: Job, request: bytes, clients: dict[int, _Client], poller: select.epoll) -> LoadResult:
    samples: list[int] = []
    drain = drain_seconds(len(clients))
    errors: list[str] = []
    start = _clock()
    deadline = start + int(job.seconds * 1e9)
    last = start
    waiting = len(clients)
    for fd, client in clients.items():
        client.sent_at = _clock()
        problem = _send(client, request)
        if problem is not None:
            errors.append(problem)
            poller.unregister(fd)
            waiting -= 1
    # After the cap (count or time), no client sends again: the replies in flight are
    # awaited, for drain_seconds() at most.
    draining = False
    give_up = 0
    while waiting:
        events = poller.poll(max(0.0, ((give_up if draining else deadline) - _clock()) / 1e9))
        if not events:
            if draining:
                errors.append(f"{waiting} replies never came within {drain:.0f} s")
                break
            draining, give_up = True, _clock() + int(drain * 1e9)
            continue
        for fd, _ in events:
            client = clients[fd]
            problem = _receive(client, request)
            if problem is None:
                if client.have < len(request):
                    continue  # part of the reply: wait for the rest
                now = _clock()
                samples.append(now - client.sent_at)
                last = now
                client.have = 0
                if not draining and (now > deadline or len(samples) >= job.count):
                    draining, give_up = True, now + int(drain * 1e9)
                if not draining:
                    client.sent_at = now
                    problem = _send(client, request)
                    if problem is None:
                        continue
            if problem is not None:
                errors.append(problem)
            poller.unregister(fd)  # this client is done, well or not
            waiting -= 1
    return LoadResult(
        clients=len(clients),
        messages=len(samples),
        seconds=(last - start) / 1e9,
        samples_ns=samples,
        errors=len(errors),
        first_error=errors[0] if errors else "",
    )


def drain_seconds(clients: int) -> float:
    """How long ``clients`` clients wait for their replies in flight after the cap."""
    return DRAIN_SECONDS + clients * DRAIN_PER_CLIENT_SECONDS


def _receive(client: _Client, request: bytes) -> str | None:
    """Read what the socket has of the reply; a reason if the client has failed."""
    try:
        got = client.sock.recv_into(client.view[client.have :])
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return f"receiving an echo: {exc}"
    if got == 0:
        return "the server closed a client's connection"
    client.have += got
    if client.have == len(request) and client.reply != request:
        return "an echo differed from the message sent"
    return None


def _send(client: _Client, request: bytes) -> str | None:
    try:
        sent = client.sock.send(request)
    except OSError as exc:
        return f"sending a message: {exc}"
    # One message in flight, so the socket buffer is empty: a short send means trouble.
    return None if sent == len(request) else f"short send of {sent} of {len(request)} bytes"
