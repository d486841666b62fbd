"""One HTTP/1.1 request and its response over any udskit address, with h11.

h11 does all of the HTTP: framing of the request, parsing of the status line, headers,
chunked or length-delimited bodies, and the rules on which responses have no body (HEAD,
1xx, 204, 304). The request body is sent while the response is read (:mod:`.duplex`), as
curl does, over a socket that :func:`udskit.connect` opened, so socket files of any length,
abstract names and ``tcp:`` all work, and connect failures carry udskit's explanation. Proxy
environment variables are never consulted: the address says where the server is.
"""

from __future__ import annotations

import errno
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import h11

import udskit

from ..address import Address, AddressLike
from ..errors import ProtocolError
from .body import BODY_CHUNK, RequestBody, body_chunks, body_length
from .duplex import MAX_RESPONSE_HEAD, Duplex

__all__ = ["DEFAULT_TIMEOUT", "Exchange", "Response", "ResponseHead", "open_exchange", "request"]

#: Seconds each step (connect, then any wait for the server to read or to answer) may take.
#: An app server that needs longer for a first byte is broken or overloaded; nginx's
#: proxy_read_timeout default is 60 s, curl has no default at all. Override per call.
DEFAULT_TIMEOUT: Final = 30.0

#: The Host header when the caller gives none. A Unix socket has no host name; the servers we
#: talk to (gunicorn, uvicorn, nginx) accept any, and curl --unix-socket sends "localhost".
DEFAULT_HOST: Final = "localhost"

USER_AGENT: Final = f"udskit/{udskit.__version__}"

#: Bytes of informational (1xx) heads one request takes before its final response. A server
#: may send a few (100 Continue, 103 Early Hints) or, during a long request, a 102 Processing
#: now and then; one that sends them without end would hold the client for ever, each read
#: succeeding in time. 64 heads of the largest size accepted: days of 102s, a moment of a
#: flood. Counted as bytes, not heads, so that a patient server is never cut off early.
MAX_INFORMATIONAL: Final = 64 * MAX_RESPONSE_HEAD

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
    """A request being sent and its response being read: ``head``, then :meth:`iter_body`.

    The rest of the request body goes on being sent while the body is read. Use as a context
    manager (the connection closes on exit). Made by :func:`open_exchange`.
    """

    __slots__ = ("_address", "_channel", "_done", "_duplex", "head")

    def __init__(self, channel: udskit.Channel, duplex: Duplex, address: Address) -> None:
        self._channel = channel
        self._duplex = duplex
        self._address = address
        self._done = False
        self.head = self._read_head()

    def iter_body(self) -> Iterator[bytes]:
        """The body, chunk by chunk, as it arrives."""
        while not self._done:
            event = self._duplex.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)) or (
                event is h11.PAUSED
            ):
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
        informational = 0
        while True:
            event = self._duplex.next_event()
            if isinstance(event, h11.InformationalResponse):
                # 100 Continue and friends: the real response follows, within a bound
                informational += _head_size(event)
                if informational > MAX_INFORMATIONAL:
                    raise ProtocolError(
                        f"{self._address} sent more than {MAX_INFORMATIONAL} bytes of "
                        "informational (1xx) responses and no final one: it is not "
                        "answering the request"
                    )
                continue
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


def _head_size(event: h11.InformationalResponse) -> int:
    """The bytes of a response head as sent: status line, headers, blank line."""
    line = len(b"HTTP/1.1 100 \r\n") + len(event.reason)
    return line + sum(len(name) + len(value) + 4 for name, value in event.headers) + 2


def open_exchange(
    address: AddressLike,
    target: str = "/",
    *,
    method: str = "GET",
    headers: HeaderList = (),
    body: RequestBody = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
    max_time: float | None = None,
) -> Exchange:
    """Send one request to the server at ``address`` and return once its head has arrived.

    ``target`` is the request target (``/path?query``). ``Host`` defaults to ``localhost``.
    ``body`` is bytes, or a file opened in binary mode, read a chunk at a time as the server
    takes it (never held whole in memory); ``Content-Length`` is set from its length unless
    given, and a body of unknown length (a pipe) is sent chunked. The body is sent while
    the response is read, so an early answer (a 413) is returned, not lost.

    ``timeout`` bounds the connect and each wait for the server to read or answer;
    ``max_time`` bounds the whole exchange, until the body has been read (curl's
    ``--max-time``). Raises udskit errors: ConnectError (with the reason), Timeout,
    ConnectionClosed, ProtocolError (not HTTP, or a response head over
    :data:`~udskit.http.duplex.MAX_RESPONSE_HEAD` bytes); ValueError for a request h11
    refuses to send (a malformed header or target), or a ``timeout`` or ``max_time`` that
    is not a positive number; TypeError for a ``body`` that is neither bytes-like nor a
    file opened in binary mode. Those are raised before connecting.
    """
    where = Address.parse(address)
    for name, seconds in (("timeout", timeout), ("max_time", max_time)):
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(
                f"{name} must be a positive number of seconds, or None, not {seconds!r}"
            )
    deadline = None if max_time is None else time.monotonic() + max_time
    length = body_length(body)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    try:
        request = _request_event(method, target, headers, length)
        _check_length(request, length)
        head = conn.send(request) or b""
        if isinstance(body, (bytes, bytearray, memoryview)) and (length or 0) <= BODY_CHUNK:
            # Sent with the head in one write, as curl does: the server gets the request
            # whole, never a head whose body arrives after the answer (an app that does not
            # read the body answers the head at once). Framed now, so a body that contradicts
            # its Content-Length is refused before connecting.
            head += b"".join(_framed(conn, body, length))
    except h11.LocalProtocolError as exc:
        raise ValueError(f"cannot send this request to {where}: {exc}") from exc
    try:
        channel = udskit.connect(where, framing="raw", timeout=_first(timeout, max_time))
    except udskit.ConnectError as exc:
        if exc.errno != errno.EPROTOTYPE:
            raise
        # The connect error's advice (pass another type=) has no meaning here: HTTP runs
        # over a stream socket only.
        raise udskit.ConnectError(
            f"cannot send HTTP to {where}: it is not a stream socket (a datagram or "
            "seqpacket server is there), and HTTP needs one; check the address",
            errno=errno.EPROTOTYPE,
        ) from exc
    try:
        duplex = Duplex(
            channel.socket,
            conn,
            where,
            _outgoing(conn, head, body, length, where),
            what=f"{method} {target}",
            timeout=timeout,
            max_time=max_time,
            deadline=deadline,
        )
        return Exchange(channel, duplex, where)
    except BaseException:
        channel.close()
        raise


def request(
    address: AddressLike,
    target: str = "/",
    *,
    method: str = "GET",
    headers: HeaderList = (),
    body: RequestBody = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
    max_time: float | None = None,
) -> Response:
    """Send one request and return the whole response (see :func:`open_exchange`)."""
    with open_exchange(
        address,
        target,
        method=method,
        headers=headers,
        body=body,
        timeout=timeout,
        max_time=max_time,
    ) as exchange:
        return Response(exchange.head, exchange.read())


def _outgoing(
    conn: h11.Connection, head: bytes, body: RequestBody, length: int | None, where: Address
) -> Iterator[bytes]:
    """The request on the wire, piece by piece: the body is read as the socket takes it."""
    yield head
    if conn.our_state is not h11.SEND_BODY:
        return  # the head brought the whole request
    try:
        yield from _framed(conn, body, length)
    except h11.LocalProtocolError as exc:  # a body longer or shorter than a given length
        raise ValueError(f"cannot send this request to {where}: {exc}") from exc


def _framed(conn: h11.Connection, body: RequestBody, length: int | None) -> Iterator[bytes]:
    """The body as h11 frames it, and the end of the message."""
    for chunk in body_chunks(body, length):
        wire = conn.send(h11.Data(data=chunk))
        if wire:
            yield wire
    yield conn.send(h11.EndOfMessage()) or b""


def _check_length(request: h11.Request, length: int | None) -> None:
    """Refuse a given Content-Length that the body's known length contradicts, before
    connecting: h11 finds it only as the body goes out, after the head has gone."""
    names = {name for name, _ in request.headers}
    if length is None or b"transfer-encoding" in names or b"content-length" not in names:
        return
    declared = int(next(value for name, value in request.headers if name == b"content-length"))
    if declared != length:
        much = "much" if length > declared else "little"
        raise h11.LocalProtocolError(
            f"Too {much} data for declared Content-Length: the body is {length} bytes, "
            f"Content-Length says {declared}"
        )


def _first(timeout: float | None, max_time: float | None) -> float | None:
    """The connect's bound: the step timeout, or less when the whole exchange has less."""
    if max_time is None:
        return timeout
    return max_time if timeout is None else min(timeout, max_time)


def _request_event(
    method: str, target: str, headers: HeaderList, length: int | None
) -> h11.Request:
    given = [(str(name), str(value)) for name, value in headers]
    names = {name.lower() for name, _ in given}
    if "host" not in names:
        given.insert(0, ("Host", DEFAULT_HOST))
    if "user-agent" not in names:
        given.append(("User-Agent", USER_AGENT))
    if "content-length" not in names and "transfer-encoding" not in names:
        if length is None:
            given.append(("Transfer-Encoding", "chunked"))
        elif length or method.upper() in ("POST", "PUT", "PATCH"):
            given.append(("Content-Length", str(length)))
    try:
        return h11.Request(method=method, target=target, headers=given)
    except h11.LocalProtocolError as exc:
        raise ValueError(f"invalid HTTP request ({method} {target}): {exc}") from exc
