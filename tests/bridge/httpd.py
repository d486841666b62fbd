"""A stdlib HTTP server (http.server) on a Unix socket, in a thread: an HTTP peer that shares
no code with h11, for the client tests that do not need gunicorn."""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

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
