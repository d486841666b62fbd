"""HTTP servers on a Unix socket, in threads, for the client tests that do not need gunicorn:
a stdlib server (http.server), which shares no code with h11, and scripted servers that
misbehave on purpose."""

from __future__ import annotations

import contextlib
import hashlib
import json
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import h11

import udskit

from ..conftest import READY_TIMEOUT


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self._answer(self.rfile.read(size))

    def do_PUT(self) -> None:
        self.do_POST()

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, body: bytes) -> None:
        document = {
            "method": self.command,
            "path": self.path,
            "body": body.decode("utf-8", "replace"),
            "headers": {name.lower(): value for name, value in self.headers.items()},
        }
        payload = json.dumps(document).encode()
        status = 404 if self.path.startswith("/missing") else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep the test output clean


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # type: ignore[no-untyped-def]
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


@contextlib.contextmanager
def http_server(address: str) -> Iterator[udskit.Address]:
    """Serve HTTP on ``address`` (a path of any length, or @name) until the block ends."""
    listener = udskit.listen(address)
    server = _Server(listener.address.path, _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener.socket
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield listener.address
    finally:
        server.shutdown()
        thread.join(READY_TIMEOUT)
        listener.close()


# -- Scripted HTTP servers: one thread per connection, each running a handler on the raw
# socket, with h11 (server side) for the parsing. For the behaviours a stdlib server cannot
# show: answering before the body is read, streaming while it arrives, trickling, a huge head.

Handler = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def scripted_server(address: str, handler: Handler) -> Iterator[udskit.Address]:
    """Run ``handler(conn, stopping)`` for each connection to ``address`` until the block
    ends; ``stopping`` is set then, and every handler thread is joined (bounded)."""
    listener = udskit.listen(address)
    stopping = threading.Event()
    wake_r, wake_w = socket.socketpair()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                handler(conn, stopping)
            except (OSError, h11.RemoteProtocolError):
                pass  # the client went away, or gave up mid-request: the test judges that

    def accept_loop() -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener.socket, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            while not stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is listener.socket:
                        conn, _ = listener.socket.accept()
                        thread = threading.Thread(target=serve, args=(conn,))
                        threads.append(thread)
                        thread.start()

    acceptor = threading.Thread(target=accept_loop)
    acceptor.start()
    try:
        yield listener.address
    finally:
        stopping.set()
        wake_w.send(b"x")
        acceptor.join(READY_TIMEOUT)
        for thread in threads:
            thread.join(READY_TIMEOUT)
        wake_r.close()
        wake_w.close()
        listener.close()


def read_request_head(conn: socket.socket) -> tuple[h11.Connection, h11.Request]:
    """Read until the request's head has arrived; the body stays unread."""
    http = h11.Connection(h11.SERVER)
    while True:
        event = http.next_event()
        if isinstance(event, h11.Request):
            return http, event
        if event is h11.NEED_DATA:
            http.receive_data(conn.recv(65536))
            continue
        raise AssertionError(f"unexpected {event!r} before the request head")


def answer_413_early(conn: socket.socket, stopping: threading.Event) -> None:
    """What nginx does with client_max_body_size: answer from the head, close, body unread."""
    http, _ = read_request_head(conn)
    body = b"request body too large\n"
    headers = [("Content-Length", str(len(body))), ("Connection", "close")]
    conn.sendall(
        http.send(h11.Response(status_code=413, headers=headers, reason=b"Payload Too Large"))
        or b""
    )
    conn.sendall(http.send(h11.Data(data=body)) or b"")
    conn.sendall(http.send(h11.EndOfMessage()) or b"")


def echo_as_it_arrives(conn: socket.socket, stopping: threading.Event) -> None:
    """Answer at once, then send each piece of the body back (chunked) as it is read: the
    server only reads on once its writes went out, as a simple streaming app does."""
    http, _ = read_request_head(conn)
    conn.sendall(http.send(h11.Response(status_code=200, headers=[])) or b"")
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(conn.recv(65536))
        elif isinstance(event, h11.Data):
            conn.sendall(http.send(h11.Data(data=event.data)) or b"")
        elif isinstance(event, h11.EndOfMessage):
            conn.sendall(http.send(h11.EndOfMessage()) or b"")
            return
        else:
            raise AssertionError(f"unexpected {event!r} in the request body")


def read_and_summarise(conn: socket.socket, stopping: threading.Event) -> None:
    """Read the whole body; answer with its size, sha256 and the framing headers, as JSON."""
    http, request = read_request_head(conn)
    digest, size = hashlib.sha256(), 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(conn.recv(65536))
        elif isinstance(event, h11.Data):
            digest.update(event.data)
            size += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
    document = {
        "size": size,
        "sha256": digest.hexdigest(),
        "content-length": headers.get("content-length"),
        "transfer-encoding": headers.get("transfer-encoding"),
    }
    payload = json.dumps(document).encode()
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    conn.sendall(http.send(h11.Response(status_code=200, headers=head)) or b"")
    conn.sendall(http.send(h11.Data(data=payload)) or b"")
    conn.sendall(http.send(h11.EndOfMessage()) or b"")


#: Seconds between two bytes of a trickling answer.
TRICKLE_PAUSE = 0.1


def trickle(conn: socket.socket, stopping: threading.Event) -> None:
    """Announce a 1000-byte body, then send one byte per TRICKLE_PAUSE: a client whose
    timeout bounds each read alone would wait 100 s."""
    http, _ = read_request_head(conn)
    conn.sendall(
        http.send(h11.Response(status_code=200, headers=[("Content-Length", "1000")])) or b""
    )
    for _ in range(1000):
        if stopping.wait(TRICKLE_PAUSE):  # the pacing under test, not a synchronisation
            return
        conn.sendall(b".")


def head_of(size: int) -> Callable[[socket.socket, threading.Event], None]:
    """A server whose response head carries a header of ``size`` bytes, sent in one write."""

    def answer(conn: socket.socket, stopping: threading.Event) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 0\r\n\r\n")

    return answer


def informational_forever(conn: socket.socket, stopping: threading.Event) -> None:
    """Answer with 102 Processing heads and never a final response, as fast as the client
    reads them (bounded: by the client, which gives up)."""
    read_request_head(conn)
    head = b"HTTP/1.1 102 Processing\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
    while not stopping.is_set():
        conn.sendall(head * 16)


def cut_short(conn: socket.socket, stopping: threading.Event) -> None:
    """Announce 1000 bytes of body, send 10, close: a crash, or a relay that cut the line."""
    http, _ = read_request_head(conn)
    conn.sendall(
        http.send(h11.Response(status_code=200, headers=[("Content-Length", "1000")])) or b""
    )
    conn.sendall(b"0123456789")


def first_read(conn: socket.socket, stopping: threading.Event) -> None:
    """Answer with what one read of the request brought, unparsed: a request sent in one
    write arrives whole (a Unix stream queues each write whole), one sent in pieces not."""
    got = conn.recv(1 << 20)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(got), got))
