"""The many-clients load generator: N concurrent clients against one echo server.

One process holds all N connections in an epoll loop. Each client sends a 64-byte
length-prefixed message, waits for the same bytes back, and sends the next one (one message
in flight per client), until the message cap or the time cap; then every outstanding reply
is awaited. A reply that differs from the request, a reset, an early close, or a reply that
never comes is an error; the run reports how many, and the first.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Final

from .contenders.frames import HEADER
from .host import FD_HEADROOM, raise_nofile
from .wire import Job, LoadResult, fail

__all__ = ["DRAIN_SECONDS", "load"]

#: After the time cap, how long the clients wait for replies still in flight. A healthy
#: server answers in milliseconds; five seconds only ends a run whose server has stalled.
DRAIN_SECONDS: Final = 5.0

_clock = time.perf_counter_ns


class _Client:
    __slots__ = ("have", "reply", "sent_at", "sock", "view")

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.reply = bytearray(size)
        self.view = memoryview(self.reply)
        self.have = 0
        self.sent_at = 0


def _connect(job: Job) -> socket.socket:
    if job.option("transport", "unix") == "tcp":
        host, _, port = job.address.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Blocking connect: with a full backlog it waits for the server to accept,
            # where a non-blocking one would fail with EAGAIN.
            sock.connect(job.address)
        except OSError:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


def load(job: Job) -> LoadResult:
    """Run the clients of ``job`` (``clients``, ``size``, ``count``, ``seconds``)."""
    problem = raise_nofile(job.clients + FD_HEADROOM)
    if problem:
        fail(problem)
    request = HEADER.pack(job.size) + bytes(job.size)
    clients: dict[int, _Client] = {}
    poller = select.epoll()
    try:
        for _ in range(job.clients):
            try:
                sock = _connect(job)
            except OSError as exc:
                first = f"connected {len(clients)} of {job.clients} clients, then: {exc}"
                return LoadResult(job.clients, 0, 0.0, [], job.clients - len(clients), first)
            clients[sock.fileno()] = _Client(sock, len(request))
            poller.register(sock.fileno(), select.EPOLLIN)
        return _run(job, request, clients, poller)
    finally:
        for client in clients.values():
            client.sock.close()
        poller.close()


def _run(job: Job, request: bytes, clients: dict[int, _Client], poller: select.epoll) -> LoadResult:
    samples: list[int] = []
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
    # awaited, for DRAIN_SECONDS at most.
    draining = False
    give_up = 0
    while waiting:
        events = poller.poll(max(0.0, ((give_up if draining else deadline) - _clock()) / 1e9))
        if not events:
            if draining:
                errors.append(f"{waiting} replies never came within {DRAIN_SECONDS:.0f} s")
                break
            draining, give_up = True, _clock() + int(DRAIN_SECONDS * 1e9)
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
                    draining, give_up = True, now + int(DRAIN_SECONDS * 1e9)
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
