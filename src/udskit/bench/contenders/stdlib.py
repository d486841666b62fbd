"""Hand-written stdlib Python: blocking sockets over AF_UNIX (the baseline) or TCP loopback.

Round trips and one-way streams use one blocking socket and the hand-written framing in
:mod:`.frames`. The many-clients echo server is a ``selectors`` (epoll) loop over
non-blocking sockets that answers every whole frame, as a stdlib server for many clients
is usually written.
"""

from __future__ import annotations

import selectors
import signal
import socket
from collections.abc import Callable

from ..loops import make_payload, receive_all, run_round_trips, send_all, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult
from .frames import HEADER, FrameReader, frame

__all__ = [
    "echo_server",
    "rtt_client",
    "rtt_server",
    "stream_receiver",
    "stream_sender",
]

#: Listen backlog for the echo server: its clients connect in a burst. The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4); clients beyond it wait in connect().
_BACKLOG = 4096

#: Frames up to this size are joined with their header and sent in one call.
_JOIN_LIMIT = 64 * 1024


def _tcp(job: Job) -> bool:
    return job.option("family", "unix") == "tcp"


def _listen(job: Job, backlog: int = 1) -> tuple[socket.socket, str]:
    if _tcp(job):
        host, _, port = job.address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        return sock, f"{host}:{sock.getsockname()[1]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(job.address)
    sock.listen(backlog)
    return sock, job.address


def _accept_one(job: Job, ready: Callable[[str], None]) -> socket.socket:
    listener, address = _listen(job)
    with listener:
        ready(address)
        conn, _ = listener.accept()
    _nodelay(job, conn)
    return conn


def _connect(job: Job) -> socket.socket:
    if _tcp(job):
        host, _, port = job.address.rpartition(":")
        sock = socket.create_connection((host, int(port)))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(job.address)
    _nodelay(job, sock)
    return sock


def _nodelay(job: Job, sock: socket.socket) -> None:
    # Without TCP_NODELAY, Nagle's algorithm holds each small request back until the
    # previous one is acknowledged: a 40 ms stall per round trip, not a transport cost.
    if _tcp(job):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _send(sock: socket.socket, payload: bytes | bytearray) -> None:
    if len(payload) <= _JOIN_LIMIT:
        sock.sendall(HEADER.pack(len(payload)) + payload)
    else:
        sock.sendall(HEADER.pack(len(payload)))
        sock.sendall(payload)


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    with _accept_one(job, ready) as conn:
        reader = FrameReader(conn.recv_into)
        while (message := reader.read()) is not None:
            _send(conn, message)


def rtt_client(job: Job) -> RttResult:
    payload = make_payload(job.size)
    with _connect(job) as sock:
        reader = FrameReader(sock.recv_into)

        def once() -> None:
            sock.sendall(frame(payload))
            if reader.read() is None:
                raise ConnectionError("the server closed the connection mid-test")

        return run_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    with _accept_one(job, ready) as conn:
        reader = FrameReader(conn.recv_into)
        return receive_all(lambda: 0 if reader.read() is None else 1)


def stream_sender(job: Job) -> SendResult:
    payload = make_payload(job.size)
    with _connect(job) as sock:

        def send() -> int:
            _send(sock, payload)
            return 1

        check = stream_check_every(job.size)
        return send_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )


#: Bytes read per recv() by the echo server.
_READ_SIZE = 64 * 1024

_LISTENER = "listener"
_WAKE = "wake"


class _Client:
    """One echo-server connection: bytes in, whole frames answered, unsent bytes kept."""

    __slots__ = ("inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    """Serve every client until SIGTERM."""
    listener, address = _listen(job, _BACKLOG)
    # SIGTERM from the runner ends the loop: Python writes the signal number to the wake-up
    # socket, which makes select() return, and the handler has set the flag.
    wake_r, wake_w = socket.socketpair()
    stopping: list[int] = []
    selector = selectors.DefaultSelector()
    clients: list[_Client] = []
    with listener, wake_r, wake_w, selector:
        for sock in (listener, wake_r, wake_w):
            sock.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, _LISTENER)
        selector.register(wake_r, selectors.EVENT_READ, _WAKE)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
        ready(address)
        try:
            while not stopping:
                for key, events in selector.select():
                    if key.data is _LISTENER:
                        _accept(job, listener, selector, clients)
                    elif isinstance(key.data, _Client):
                        _serve(key.data, events, selector)
        finally:
            signal.set_wakeup_fd(-1)
            for client in clients:
                client.sock.close()


def _accept(
    job: Job, listener: socket.socket, selector: selectors.BaseSelector, clients: list[_Client]
) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        _nodelay(job, conn)
        conn.setblocking(False)
        client = _Client(conn)
        clients.append(client)
        selector.register(conn, selectors.EVENT_READ, client)


def _serve(client: _Client, events: int, selector: selectors.BaseSelector) -> None:
    try:
        if events & selectors.EVENT_READ:
            data = client.sock.recv(_READ_SIZE)
            if not data:
                _drop(client, selector)
                return
            client.inbox += data
            _answer(client)
    except (BlockingIOError, InterruptedError):
        pass  # a spurious wake-up: nothing to read after all
    except OSError:  # reset by the peer: this client is gone, the others go on
        _drop(client, selector)
        return
    try:
        if client.outbox:
            _flush(client, selector)
    except OSError:  # reset by the peer: this client is gone, the others go on
        _drop(client, selector)


def _drop(client: _Client, selector: selectors.BaseSelector) -> None:
    selector.unregister(client.sock)
    client.sock.close()


def _answer(client: _Client) -> None:
    inbox = client.inbox
    start = 0
    while len(inbox) - start >= HEADER.size:
        (size,) = HEADER.unpack_from(inbox, start)
        end = start + HEADER.size + size
        if end > len(inbox):
            break
        message = bytes(inbox[start + HEADER.size : end])
        client.outbox += frame(message)
        start = end
    del inbox[:start]


def _flush(client: _Client, selector: selectors.BaseSelector) -> None:
    try:
        sent = client.sock.send(client.outbox)
    except (BlockingIOError, InterruptedError):
        sent = 0  # the socket buffer is full: wait for EVENT_WRITE
    del client.outbox[:sent]
    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbox else 0)
    if selector.get_key(client.sock).events != want:
        selector.modify(client.sock, want, client)
