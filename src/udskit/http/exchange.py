"""One HTTP/1.1 request and its response over any udskit address, with h11.

h11 does all of the HTTP: framing of the request, parsing of the status line, headers,
chunked or length-delimited bodies, and the rules on which responses have no body (HEAD,
1xx, 204, 304). This module only moves its bytes over a socket that :func:`udskit.connect`
opened, so socket files of any length, abstract names and ``tcp:`` all work, and connect
failures carry udskit's explanation. Proxy environment variables are never consulted: the
address says where the server is.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, cast

import h11

import udskit

from ..address import Address, AddressLike
from ..errors import ProtocolError
from ..translate import translating

__all__ = ["DEFAULT_TIMEOUT", "Exchange", "Response", "ResponseHead", "open_exchange", "request"]

#: Seconds each step (connect, each send, each receive) may take. An app server that needs
#: longer for a first byte is broken or overloaded; nginx's proxy_read_timeout default is 60 s,
#: curl has no default at all. Override per call.
DEFAULT_TIMEOUT: Final = 30.0

#: Bytes read per recv(): large enough that a big body streams in few system calls.
READ_CHUNK: Final = 64 * 1024

#: The Host header when the caller gives none. A Unix socket has no host name; the servers we
#: talk to (gunicorn, uvicorn, nginx) accept any, and curl --unix-socket sends "localhost".
DEFAULT_HOST: Final = "localhost"

USER_AGENT: Final = f"udskit/{udskit.__version__}"

HeaderList = Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line and headers of a response (header names lower-cased, in order)."""

    status: int
    reason: str
    http_version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response: head and body."""

    head: ResponseHead
    body: bytes

    @property
    def status(self) -> int:
        return self.head.status

    def header(self, name: str) -> str | None:
        return self.head.header(name)

    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> object:
        """The body parsed as JSON (ValueError if it is not)."""
        return json.loads(self.body)


class Exchange:
    """A request sent and its response being read: ``head``, then :meth:`iter_body`.

    Use as a context manager (the connection closes on exit). Made by :func:`open_exchange`.
    """

    __slots__ = ("_address", "_channel", "_conn", "_done", "_seen", "head")

    def __init__(self, channel: udskit.Channel, conn: h11.Connection, address: Address) -> None:
        self._channel = channel
        self._conn = conn
        self._address = address
        self._done = False
        self._seen = False  # any byte of the response yet
        self.head = self._read_head()

    def iter_body(self) -> Iterator[bytes]:
        """The body, chunk by chunk, as it arrives."""
        while not self._done:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._done = True

    def read(self) -> bytes:
        """The rest of the body."""
        return b"".join(self.iter_body())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_head(self) -> ResponseHead:
        while True:
            event = self._next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: the real response follows
            if isinstance(event, h11.Response):
                return ResponseHead(
                    status=event.status_code,
                    reason=event.reason.decode("latin-1"),
                    http_version=event.http_version.decode("ascii"),
                    headers=tuple(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in event.headers
                    ),
                )
            raise ProtocolError(f"{self._address} closed the connection without an HTTP response")

    def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        sock = self._channel.socket
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(
                    f"{self._address} does not answer in HTTP/1.1: {exc}; is it an HTTP server?"
                ) from exc
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            with translating("recv", self._address):
                data = sock.recv(READ_CHUNK)
            if not data and self._conn.their_state is h11.SEND_RESPONSE and not self._seen:
                raise ProtocolError(
                    f"{self._address} closed the connection without an HTTP response (did the "
                    "server crash, or is it not an HTTP server?)"
                )
            self._seen = self._seen or bool(data)
            self._conn.receive_data(data)  # b"" tells h11 the server closed


def open_exchange(
    address: AddressLike,
    target: str = "/",
    *,
    method: str = "GET",
    headers: HeaderList = (),
    body: bytes = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Exchange:
    """Send one request to the server at ``address`` and return once its head has arrived.

    ``target`` is the request target (``/path?query``). ``Host`` defaults to ``localhost``;
    ``Content-Length`` is set from ``body`` unless given. Raises udskit errors: ConnectError
    (with the reason), Timeout, ConnectionClosed, ProtocolError (not HTTP); ValueError for a
    request h11 refuses to send (a malformed header or target).
    """
    where = Address.parse(address)
    request_event = _request_event(method, target, headers, body)
    conn = h11.Connection(h11.CLIENT)
    try:
        wire = conn.send(request_event)
        if body:
            wire += conn.send(h11.Data(data=body))
        wire += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        raise ValueError(f"cannot send this request to {where}: {exc}") from exc
    channel = udskit.connect(where, framing="raw", timeout=timeout)
    try:
        with translating("send", where):
            channel.socket.sendall(wire, socket.MSG_NOSIGNAL)
        return Exchange(channel, conn, where)
    except BaseException:
        channel.close()
        raise


def request(
    address: AddressLike,
    target: str = "/",
    *,
    method: str = "GET",
    headers: HeaderList = (),
    body: bytes = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Response:
    """Send one request and return the whole response (see :func:`open_exchange`)."""
    with open_exchange(
        address, target, method=method, headers=headers, body=body, timeout=timeout
    ) as exchange:
        return Response(exchange.head, exchange.read())


def _request_event(method: str, target: str, headers: HeaderList, body: bytes) -> h11.Request:
    given = [(str(name), str(value)) for name, value in headers]
    names = {name.lower() for name, _ in given}
    if "host" not in names:
        given.insert(0, ("Host", DEFAULT_HOST))
    if "user-agent" not in names:
        given.append(("User-Agent", USER_AGENT))
    if (
        "content-length" not in names
        and "transfer-encoding" not in names
        and (body or method.upper() in ("POST", "PUT", "PATCH"))
    ):
        given.append(("Content-Length", str(len(body))))
    try:
        return h11.Request(method=method, target=target, headers=given)
    except h11.LocalProtocolError as exc:
        raise ValueError(f"invalid HTTP request ({method} {target}): {exc}") from exc
