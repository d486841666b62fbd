"""Relay every connection between two addresses: ``udskit bridge LISTEN TARGET``.

Any two stream addresses of :mod:`udskit.address` can be joined: ``tcp:127.0.0.1:8080`` in
front of ``/run/app.sock`` (expose a socket on TCP), a socket file in front of a TCP service,
an abstract name in front of a path, and so on. For each accepted client the bridge connects
to the target and copies bytes both ways until both directions have ended:

* full duplex, and half-close kept: end of stream from one side becomes ``shutdown(SHUT_WR)``
  towards the other, and the other direction keeps flowing (an HTTP client that half-closes
  after its request still gets the response);
* bounded buffers with backpressure: when one side's write buffer goes above
  :data:`RELAY_HIGH_WATER`, the bridge stops reading from the other side until it drains to
  :data:`RELAY_LOW_WATER`, so a slow reader never makes the bridge hold more than a few
  hundred KiB per connection;
* the listening side is claimed like any udskit listener (a live server's socket is never
  taken, a stale one is reclaimed, the file appears with its final mode) and released on
  close; an access :class:`~udskit.Policy` is checked at accept on a Unix listening side;
* a target that is down costs the one client its connection and one log line; the bridge
  keeps serving.

The relay runs on asyncio's low-level transports and protocols (uvloop's when installed, via
:func:`run`), one event loop for all connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

from .accepting import AcceptVerdict, Backoff, classify, relays_that_fit
from .address import Address, AddressLike
from .admission import REFUSED, Admitted, admit
from .aio.connecting import connect_waiting
from .aio.listening import claim_in_thread
from .aio.loops import new_event_loop
from .aio.signals import give_back_signals, take_signals
from .creds import Policy
from .errors import ConnectError, Timeout, UdsError
from .listening import Listener, listen
from .options import DEFAULT_BACKLOG, check_max_clients, tune_buffers
from .tcp import open_tcp
from .translate import translate

__all__ = ["Bridge", "BridgeStats", "connect_socket", "run", "serve", "start"]

log = logging.getLogger("udskit")

#: A side's write buffer above which we stop reading from the other side. 256 KiB is the size
#: of one read by asyncio and uvloop, so one full read always fits, and with the kernel's own
#: socket buffers (about 200 KiB each way by default) it keeps a fast sender streaming while
#: bounding what one connection can make the bridge hold.
RELAY_HIGH_WATER: Final = 256 * 1024

#: Reading resumes once the write buffer has drained to this: low enough that pause/resume
#: does not flap on every write, high enough that the writer never runs dry while we wake up.
RELAY_LOW_WATER: Final = 64 * 1024

#: Seconds to wait for the target to accept a connection. A Unix listener whose backlog is
#: full answers EAGAIN at once (nginx reports it as a 502 "(11: Resource temporarily
#: unavailable)"); we retry until this deadline, as a blocking client would wait.
CONNECT_TIMEOUT: Final = 10.0

#: Connections accepted per wake-up of the listening socket, so that a flood of new clients
#: does not starve the data of established ones.
ACCEPT_BATCH: Final = 64

#: How long a stop waits for the connections' buffered data to be written before it cuts them.
SHUTDOWN_GRACE: Final = 5.0

#: SO_LINGER on, with a linger time of 0: close() then drops what is unsent and answers with
#: a TCP reset (RST) instead of the orderly FIN, so that the peer's read fails with
#: ECONNRESET instead of reading an end of stream that would make a cut transfer look whole.
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)

#: How long a stop waits, after cutting connections, for their transports to close: they do
#: on the event loop's next iterations, so this is only a bound, never a delay.
ABORT_WAIT: Final = 1.0


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """A snapshot of a bridge's counters."""

    accepted: int  # clients accepted and allowed by the policy
    refused: int  # clients the access policy refused
    failed: int  # clients closed because the target could not be reached
    active: int  # connections being relayed now
    bytes_up: int  # client -> target, over the bridge's life
    bytes_down: int  # target -> client
    buffered: int  # bytes held in write buffers now, all connections together
    paused: int  # directions whose reading is paused by backpressure now


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it reads is written to the other end."""

    __slots__ = ("eof", "held", "held_eof", "name", "other", "paused", "relay", "transport")

    def __init__(self, relay: _Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.other: _Side = self  # linked right after both are made
        self.transport: asyncio.Transport | None = None
        # Data (and end of stream) read before the other end's transport exists: a read can
        # complete while the second transport is still being set up.
        self.held: list[bytes] = []
        self.held_eof = False
        self.eof = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=RELAY_HIGH_WATER, low=RELAY_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        out = self.other.transport
        if out is None:
            self.held.append(data)
            self._pause()
            return
        out.write(data)
        self.relay.count(self, len(data))

    def eof_received(self) -> bool:
        self.eof = True
        if self.other.transport is None:
            self.held_eof = True
        else:
            self.relay.forward_eof(self)
        # True: keep our transport open, the other direction may still be flowing.
        return True

    def pause_writing(self) -> None:
        self.other._pause()

    def resume_writing(self) -> None:
        self.other._resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(self, exc)

    def flush_held(self) -> None:
        """Pass on what was read before the other end was ready, and start reading."""
        held, self.held = self.held, []
        out = self.other.transport
        assert out is not None
        for data in held:
            out.write(data)
            self.relay.count(self, len(data))
        if self.held_eof:
            self.relay.forward_eof(self)
        self._resume()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def buffered(self) -> int:
        if self.transport is None or self.transport.is_closing():
            return 0
        return self.transport.get_write_buffer_size()


class _Relay:
    """One client connection and its connection to the target."""

    __slots__ = ("bridge", "client", "closed", "label", "lost_count", "target")

    def __init__(self, bridge: Bridge, label: str) -> None:
        self.bridge = bridge
        self.label = label
        self.client = _Side(self, "client")
        self.target = _Side(self, "target")
        self.client.other, self.target.other = self.target, self.client
        self.lost_count = 0
        self.closed = False

    def count(self, side: _Side, size: int) -> None:
        if side is self.client:
            self.bridge._bytes_up += size
        else:
            self.bridge._bytes_down += size

    def forward_eof(self, side: _Side) -> None:
        """``side`` sent end of stream: half-close towards the other end, or finish."""
        out = side.other.transport
        if out is not None and not out.is_closing() and out.can_write_eof():
            out.write_eof()  # after the buffered data, as shutdown(SHUT_WR)
        if side.other.eof:
            self.close()  # both directions are done; close() still writes what is buffered

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.target):
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        """Cut both ends: what is buffered is dropped, and neither peer reads an orderly
        end of stream (see :func:`_reset`)."""
        self.closed = True
        for side in (self.client, self.target):
            if side.transport is not None:
                _reset(side.transport)
                side.transport.abort()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        self.lost_count += 1
        if exc is not None:
            log.debug("%s: %s connection lost: %s", self.label, side.name, exc)
            self.abort()  # a reset on one side: no orderly end is possible on the other
        else:
            self.close()
        if self.lost_count == 2:
            self.bridge._finished(self)

    def buffered(self) -> int:
        return self.client.buffered() + self.target.buffered()

    def paused(self) -> int:
        return int(self.client.paused) + int(self.target.paused)


class Bridge:
    """A running relay from a listening address to a target. Make one with :func:`start`.

    All methods must be called from the event loop the bridge runs on.
    """

    def __init__(
        self,
        listener: Listener,
        target: Address,
        *,
        loop: asyncio.AbstractEventLoop,
        max_connections: int | None,
    ) -> None:
        self._listener = listener
        self._sock = listener.socket
        self._loop = loop
        self._max_connections = max_connections
        self.target = target
        #: The listening address; for ``tcp:HOST:0``, with the port the kernel chose.
        self.address = listener.address
        self._relays: set[_Relay] = set()
        self._pending: set[asyncio.Task[None]] = set()  # the tasks that open connections
        self._connecting = 0  # of those, the ones still connecting to the target
        self._accepting = False
        self._closed = False
        self._backoff = Backoff()  # pauses after accept(2) runs out of resources
        self._resume_handle: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepted = self._refused = self._failed = 0
        self._bytes_up = self._bytes_down = 0
        self._sock.setblocking(False)
        self._start_accepting()

    # -- public ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> BridgeStats:
        return BridgeStats(
            accepted=self._accepted,
            refused=self._refused,
            failed=self._failed,
            active=len(self._relays) + self._connecting,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
            buffered=sum(r.buffered() for r in self._relays),
            paused=sum(r.paused() for r in self._relays),
        )

    def close(self) -> None:
        """Stop accepting and release the listening address (its socket file is removed).

        Connections already being relayed go on; :meth:`aclose` ends them too.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_accepting()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self._listener.close()

    async def aclose(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Close, then end every connection: buffered data gets ``grace`` seconds to be
        written, after which the remaining connections are cut: reset (a TCP peer reads
        ECONNRESET), never ended as if the transfer were complete."""
        self.close()
        for task in list(self._pending):
            task.cancel()
        for relay in list(self._relays):
            relay.close()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning(
                "%s: %d connections did not finish within %g s of the stop; cutting them",
                self.address,
                len(self._relays),
                grace,
            )
            for relay in list(self._relays):
                relay.abort()
            # Aborted transports report connection_lost (and close) on the next iterations.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), ABORT_WAIT)

    async def serve_forever(self) -> None:
        """Relay until cancelled; then :meth:`aclose`."""
        try:
            await asyncio.Future()
        finally:
            await self.aclose()

    async def __aenter__(self) -> Bridge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._relays)} connections"
        return f"<Bridge {self.address} -> {self.target} {state}>"

    # -- accepting -------------------------------------------------------------------------
    def _start_accepting(self) -> None:
        if not self._accepting and not self._closed:
            self._accepting = True
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def _stop_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._at_capacity():
                self._stop_accepting()  # resumed by _finished()
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing (left) to accept: wait for the next readiness
            except OSError as exc:
                verdict = classify(exc)
                if verdict is AcceptVerdict.RETRY:
                    continue
                self._stop_accepting()
                if verdict is AcceptVerdict.BACK_OFF:
                    pause = self._backoff.failed(exc, self.address)
                    self._resume_handle = self._loop.call_later(pause, self._resume)
                else:
                    log.error("%s: accept failed, no longer accepting: %s", self.address, exc)
                return
            self._backoff.succeeded(self.address)
            self._admit(conn)

    def _resume(self) -> None:
        self._resume_handle = None
        self._start_accepting()

    def _at_capacity(self) -> bool:
        limit = self._max_connections
        return limit is not None and len(self._relays) + self._connecting >= limit

    def _admit(self, conn: socket.socket) -> None:
        policy = self._listener.policy
        admitted = admit(conn, self.address, policy, (None, None), blocking=False)
        if admitted is REFUSED:
            self._refused += 1
        if not isinstance(admitted, Admitted):
            return
        label = f"{self.address} -> {self.target}"
        if admitted.peer is not None:
            label = f"{label} (client pid {admitted.peer.pid}, uid {admitted.peer.uid})"
        self._accepted += 1
        self._idle.clear()
        self._connecting += 1
        task = self._loop.create_task(self._open(conn, label))
        self._pending.add(task)
        task.add_done_callback(self._pending_done)

    def _pending_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._maybe_idle()

    async def _open(self, conn: socket.socket, label: str) -> None:
        """Connect to the target and start relaying ``conn``; on failure, log and close it."""
        try:
            upstream = await connect_socket(self.target)
        except (UdsError, OSError) as exc:
            self._failed += 1
            log.warning("%s: %s", label, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        finally:
            self._connecting -= 1
        relay = _Relay(self, label)  # counted as a relay from here on, with no await between
        self._relays.add(relay)
        try:
            await self._loop.connect_accepted_socket(lambda: relay.client, sock=conn)
            await self._loop.connect_accepted_socket(lambda: relay.target, sock=upstream)
        except BaseException as exc:
            # Cancelled by a stop, or a transport could not be made: close whatever exists.
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("%s: cannot relay: %s", label, exc)
            relay.abort()
            if relay.client.transport is None:
                conn.close()
            if relay.target.transport is None:
                upstream.close()
            self._relays.discard(relay)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return
        relay.client.flush_held()
        relay.target.flush_held()

    def _finished(self, relay: _Relay) -> None:
        self._relays.discard(relay)
        if not self._closed and not self._accepting and self._resume_handle is None:
            self._start_accepting()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._relays and not self._pending:
            self._idle.set()


def _reset(transport: asyncio.BaseTransport) -> None:
    """Make the coming close of ``transport`` a reset rather than an end of stream.

    TCP: SO_LINGER with a zero linger time, so the peer gets an RST and its next read fails
    with ECONNRESET. A Unix stream socket has no reset, and SO_LINGER does nothing there:
    its peer gets ECONNRESET only if the bridge leaves data of its unread at the close (as
    when the bridge had stopped reading it); otherwise the peer reads an end of stream, and
    only the protocol's own framing (Content-Length, chunked coding, length prefixes) shows
    that the transfer was cut. The bridge never half-closes (shuts down writing) first.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    except OSError as exc:  # the socket is already gone: there is nothing left to reset
        log.debug("cannot set SO_LINGER before a reset: %s", exc)


async def connect_socket(target: Address) -> socket.socket:
    """A connected, non-blocking stream socket to ``target`` (a path of any length, an
    abstract name or ``tcp:``), for asyncio code. Failures raise udskit errors that say why
    (ConnectError, Timeout); a full backlog is retried for up to :data:`CONNECT_TIMEOUT`."""
    if target.kind == "tcp":
        return await _connect_tcp(target)
    if target.kind == "fd":
        raise ValueError(f"cannot connect to {target}: a descriptor is not an address")
    try:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
    except OSError as exc:  # EMFILE/ENFILE: out of descriptors, said as a connect failure
        raise translate(exc, "connect", target) from exc
    try:
        tune_buffers(sock, None, None)
        try:
            await connect_waiting(sock, target, CONNECT_TIMEOUT)
        except Timeout as exc:  # only a full backlog makes a Unix connect wait
            raise ConnectError(
                f"cannot connect to {target}: its backlog stayed full for "
                f"{CONNECT_TIMEOUT:.0f} s; the server is not accepting",
                errno=errno.EAGAIN,
            ) from exc
        except ConnectError as exc:
            if exc.errno != errno.EPROTOTYPE:
                raise
            # Its advice (pass another type=) does not apply: only a stream is relayed.
            raise ConnectError(
                f"cannot connect to {target}: it is not a stream socket (a datagram or "
                "seqpacket server is there), and only a stream connection can be relayed; "
                "check the address",
                errno=errno.EPROTOTYPE,
            ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_tcp(target: Address) -> socket.socket:
    try:
        return await open_tcp(target, CONNECT_TIMEOUT, prepare=_default_buffers)
    except TimeoutError:
        raise Timeout(
            f"cannot connect to {target}: no answer within {CONNECT_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise translate(exc, "connect", target) from exc


def _default_buffers(sock: socket.socket) -> None:
    tune_buffers(sock, None, None)


def _same_place(listen_address: Address, target: Address) -> bool:
    """Whether ``target`` names ``listen_address`` itself, spelt the same or not (``./a``
    and its absolute path). A bridge to itself would accept its own connections without
    end, until it runs out of descriptors."""
    if listen_address.kind != target.kind:
        return False
    if listen_address.kind == "path":
        return os.path.abspath(listen_address.raw) == os.path.abspath(target.raw)
    if listen_address.kind == "tcp":
        return listen_address.port != 0 and listen_address == target
    return listen_address == target


async def start(
    listen_address: AddressLike,
    target: AddressLike,
    *,
    mode: int = 0o600,
    owner: int | str | None = None,
    group: int | str | None = None,
    allow: Policy | None = None,
    backlog: int = DEFAULT_BACKLOG,
    max_connections: int | None = None,
) -> Bridge:
    """Listen on ``listen_address`` and relay each connection to ``target``.

    The listening side is claimed like :func:`udskit.listen` (``mode``/``owner``/``group``
    for a socket file, ``allow`` checked for every Unix client). ``max_connections`` bounds
    the connections relayed at once (further clients wait in the backlog); None, the
    default: as many as the open-file limit leaves room for, two descriptors each, after
    this process's soft limit is raised to its hard one (:func:`udskit.accepting.relays_that_fit`;
    a change to the whole process, as a server makes once it runs out). Errors about the
    addresses (malformed, in use, not a stream address) are raised here; an unreachable
    target is only found per connection, and logged.
    """
    source = Address.parse(listen_address)
    destination = Address.parse(target)
    if destination.kind == "fd":
        raise ValueError(
            f"cannot bridge to {destination}: the target must be an address to connect to "
            "(a path, @name or tcp:HOST:PORT), not a descriptor"
        )
    if _same_place(source, destination):
        raise ValueError(
            f"cannot bridge {source} to itself: every connection would be relayed back to "
            "the bridge; give a TARGET other than LISTEN"
        )
    check_max_clients(max_connections, "max_connections")
    if max_connections is None:
        max_connections = relays_that_fit()
    loop = asyncio.get_running_loop()
    listener = await claim_in_thread(
        functools.partial(
            listen,
            source,
            type="stream",
            mode=mode,
            owner=owner,
            group=group,
            allow=allow,
            backlog=backlog,
        )
    )
    try:
        return Bridge(listener, destination, loop=loop, max_connections=max_connections)
    except BaseException:
        listener.close()
        raise


async def serve(
    listen_address: AddressLike,
    target: AddressLike,
    *,
    started: Callable[[Bridge], object] | None = None,
    mode: int = 0o600,
    owner: int | str | None = None,
    group: int | str | None = None,
    allow: Policy | None = None,
    backlog: int = DEFAULT_BACKLOG,
    max_connections: int | None = None,
) -> None:
    """Relay from ``listen_address`` to ``target`` until cancelled (see :func:`start`).

    ``started(bridge)`` is called once the listening side accepts connections.
    """
    bridge = await start(
        listen_address,
        target,
        mode=mode,
        owner=owner,
        group=group,
        allow=allow,
        backlog=backlog,
        max_connections=max_connections,
    )
    if started is not None:
        started(bridge)
    await bridge.serve_forever()


def run(
    listen_address: AddressLike,
    target: AddressLike,
    *,
    started: Callable[[Bridge], object] | None = None,
    mode: int = 0o600,
    owner: int | str | None = None,
    group: int | str | None = None,
    allow: Policy | None = None,
    backlog: int = DEFAULT_BACKLOG,
    max_connections: int | None = None,
) -> None:
    """Blocking :func:`serve` on its own event loop (uvloop's when installed).

    In the main thread, SIGTERM and SIGINT stop the bridge cleanly: it stops accepting,
    removes its socket file, lets buffered data out (for up to :data:`SHUTDOWN_GRACE`
    seconds) and returns.
    """
    loop = new_event_loop()  # uvloop's when installed
    try:
        loop.run_until_complete(
            _run_until_signalled(
                lambda: serve(
                    listen_address,
                    target,
                    started=started,
                    mode=mode,
                    owner=owner,
                    group=group,
                    allow=allow,
                    backlog=backlog,
                    max_connections=max_connections,
                )
            )
        )
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def _run_until_signalled(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main())
    installed = take_signals(loop, lambda signum: task.cancel())
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # we were cancelled from outside, not by a signal
    finally:
        give_back_signals(loop, installed)
