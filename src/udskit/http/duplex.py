"""Send a request and read its response at the same time, on one non-blocking socket.

A server may answer before it has read the whole request body: a 413 sent as soon as the
head shows the body is too large, followed by a close; or an echo that streams its answer
while the body still arrives. A client that sends the whole body before reading loses the
first answer (its send fails once the server has closed) and deadlocks with the second (both
sides block on full socket buffers). So, as curl does, one poll() loop does both: it reads
whenever the socket is readable, writes the next piece of the request whenever it is
writable, and stops sending once the response is complete or the server stops reading.

h11 still does all of the HTTP; this module only moves bytes and keeps the clocks: the
step ``timeout`` (no progress either way for that long) and the overall deadline
(``max_time``, curl's ``--max-time``).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Final, cast

import h11

from ..address import Address
from ..errors import ConnectionClosed, ProtocolError, Timeout
from ..translate import translate

__all__ = ["MAX_RESPONSE_HEAD", "READ_CHUNK", "Duplex"]

#: Bytes read per recv(): large enough that a big body streams in few system calls.
READ_CHUNK: Final = 64 * 1024

#: The largest response head (status line and headers) we accept, and the longest line of a
#: chunked body's framing: h11's own default, which it chose after the limits of node, nginx
#: (8 KiB per header line) and Apache. A larger head is a broken or hostile server.
MAX_RESPONSE_HEAD: Final = 16 * 1024

_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITABLE: Final = select.POLLOUT | select.POLLHUP | select.POLLERR
_WATCH_WRITING: Final = select.POLLIN | select.POLLOUT


class Duplex:
    """An h11 client connection driven over ``sock``: :meth:`next_event` returns the
    response's next event, sending the rest of ``outgoing`` (the request, already framed by
    h11) while it waits.

    ``timeout`` bounds each wait for progress, ``deadline`` (a ``time.monotonic()`` value)
    the whole exchange; either may be None. ``what`` (``GET /path``) names the request in
    errors.
    """

    __slots__ = (
        "_address",
        "_conn",
        "_deadline",
        "_eof",
        "_head_seen",
        "_max_time",
        "_outgoing",
        "_pending",
        "_poller",
        "_request_sent",
        "_sending",
        "_sock",
        "_timeout",
        "_what",
        "received",
        "sent",
    )

    def __init__(
        self,
        sock: socket.socket,
        conn: h11.Connection,
        address: Address,
        outgoing: Iterator[bytes],
        *,
        what: str,
        timeout: float | None,
        max_time: float | None,
        deadline: float | None,
    ) -> None:
        self._sock = sock
        self._conn = conn
        self._address = address
        self._outgoing = outgoing
        self._what = what
        self._timeout = timeout
        self._max_time = max_time
        self._deadline = deadline
        self._pending = memoryview(b"")
        self._sending = True
        self._request_sent = False
        self._head_seen = False
        self._eof = False
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        sock.setblocking(False)
        #: Bytes of the request written, and of the response read, so far.
        self.sent = 0
        self.received = 0

    def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The response's next event (never NEED_DATA). Raises udskit errors: Timeout,
        ConnectionClosed, ProtocolError."""
        while True:
            event = self._parse()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    # h11 applies its limit only to a head still incomplete; one that came
                    # whole in a single read is measured here, so the limit is the same.
                    if self.received - len(self._conn.trailing_data[0]) > MAX_RESPONSE_HEAD:
                        raise self._too_large()
                    self._head_seen = True
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    # The answer is complete: the rest of the request would go unread.
                    self._sending = False
                return cast("h11.Event | type[h11.PAUSED]", event)
            self._step()

    # -- one round of poll() -------------------------------------------------------------
    def _step(self) -> None:
        writing = self._want_write()
        self._poller.modify(self._sock.fileno(), _WATCH_WRITING if writing else select.POLLIN)
        wait = self._wait()
        ready = self._poller.poll(None if wait is None else max(int(wait * 1000) + 1, 1))
        if not ready:
            raise self._late(writing)
        revents = ready[0][1]
        if writing and revents & _WRITABLE:
            self._send()
        if revents & _READABLE:
            self._recv()

    def _want_write(self) -> bool:
        if self._sending and not self._pending:
            try:
                self._pending = memoryview(next(self._outgoing))
            except StopIteration:
                self._sending = False
                self._request_sent = True
        return self._sending

    def _send(self) -> None:
        try:
            sent = self._sock.send(self._pending, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return  # not writable after all; poll() again
        except ConnectionError:
            # EPIPE, ECONNRESET: the server stopped reading, and may well have answered
            # first (413 and close). Stop sending; what it said is in the receive queue.
            self._sending = False
            self._pending = memoryview(b"")
            return
        except OSError as exc:
            raise translate(exc, "send", self._address) from exc
        self._pending = self._pending[sent:]
        self.sent += sent

    def _too_large(self) -> ProtocolError:
        part = (
            "a line of the response body's chunked framing"
            if self._head_seen
            else "the response head (status line and headers)"
        )
        return ProtocolError(
            f"{self._address}: {part} is larger than {MAX_RESPONSE_HEAD} bytes, the most "
            "udskit accepts (h11's own limit)"
        )

    def _recv(self) -> None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionError as exc:
            if not self._head_seen:
                raise self._no_response() from exc
            raise translate(exc, "recv", self._address) from exc
        except OSError as exc:
            raise translate(exc, "recv", self._address) from exc
        if not data and not self._head_seen and self.received == 0:
            raise self._no_response()
        self.received += len(data)
        self._eof = not data
        self._conn.receive_data(data)  # b"" tells h11 the server closed

    def _parse(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            if len(self._conn.trailing_data[0]) > MAX_RESPONSE_HEAD:
                raise self._too_large() from exc
            if self._head_seen and self._eof:
                raise ConnectionClosed(
                    f"{self._address} closed the connection before the end of the response: "
                    f"{exc}; the body is incomplete"
                ) from exc
            raise ProtocolError(
                f"{self._address} does not answer in HTTP/1.1: {exc}; is it an HTTP server?"
            ) from exc

    # -- clocks and errors ----------------------------------------------------------------
    def _wait(self) -> float | None:
        if self._deadline is None:
            return self._timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._over_time()
        return left if self._timeout is None else min(left, self._timeout)

    def _late(self, writing: bool) -> Timeout:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return self._over_time()
        if writing:
            return Timeout(
                f"send to {self._address} timed out: the server neither read the request nor "
                f"answered within {self._timeout:g} s"
            )
        return Timeout(
            f"receive from {self._address} timed out: no data within {self._timeout:g} s"
        )

    def _over_time(self) -> Timeout:
        return Timeout(
            f"{self._what} on {self._address} did not finish within {self._max_time:g} s "
            f"({self.received} bytes of the response received)"
        )

    def _no_response(self) -> ProtocolError:
        during = "" if self._request_sent else f" after {self.sent} bytes of the request"
        return ProtocolError(
            f"{self._address} closed the connection{during} without an HTTP response (did the "
            "server crash, or is it not an HTTP server?)"
        )
