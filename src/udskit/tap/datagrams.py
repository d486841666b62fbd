"""The relay for datagram sockets: each sender gets a socket of its own towards the server,
so that the server's replies find their way back to that sender.

The relay's socket at PATH receives every datagram with its sender's address and
credentials (SO_PASSCRED). For each new sender it makes a socket *connected* to the
server's (so that only the server can send to it) and, if the sender has a name the server
could answer, binds it to a fresh abstract name; datagrams go on through that socket, and
what the server sends there is relayed back to the sender from the socket at PATH.

Credentials: as root, each datagram carries its sender's pid, uid and gid (SCM_CREDENTIALS,
which root may set); otherwise a datagram from another user is refused (shown, and not
delivered: sending it as ourselves would give it our rights), and one from our own user
goes with our credentials.

An unbound sender cannot be answered; older kernels give it an autobound abstract name
when it sends to a receiver with SO_PASSCRED, recent ones leave it nameless (then its pid
tells it from other unbound senders). Its socket towards the server stays unbound too, so
the server sees an unbound sender, as it would without the tap.

Replies reach the sender from the relay socket's address (its private directory's name,
not PATH's): a client that drops datagrams from any address but the server's (socat's
UNIX-SENDTO does, from 1.7.4 at least) will not see replies while tapped.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from ..accepting import relays_that_fit
from ..ancillary import RECV_FLAGS, ancillary_size, close_fds, rights, unpack
from ..creds import UCRED, PeerCred
from ..wakeup import WakeUp
from .credentials import Identity
from .describe import describe
from .events import Closed, Data, Event, Opened, PassedFd, Refused
from .pump import MAX_FDS
from .relay import DRAIN_AFTER_RESTORE

__all__ = ["DatagramRelay"]

#: Senders relayed at once, each with its own socket, or fewer where the open-file limit
#: leaves room for fewer; the least recently heard-from is closed to make room for a new
#: one (its later datagrams get a new socket).
MAX_SENDERS: Final = 1024

#: How long the relay keeps a sender's socket open after the tap stops, for late replies:
#: socat's -t default, as cli/_relay.py's DGRAM_LINGER.
LINGER: Final = 0.5

#: The kernel's autobind names: an abstract name of five hex digits (net/unix/af_unix.c).
_AUTOBOUND: Final = re.compile(rb"^\x00[0-9a-f]{5}$")

_ANCILLARY: Final = ancillary_size(MAX_FDS)

#: How long a reply waits for room in its client's queue. One thread relays every sender,
#: so a client that never reads its replies must not hold up the others (or the tap's
#: stop): past this, the reply is dropped and reported, and so are later ones to that
#: client, without waiting, until one fits again.
REPLY_WAIT: Final = 1.0

#: Datagrams taken from clients per wake-up: the server's replies are read between two
#: batches, so that clients that never pause do not hold them up.
_CLIENT_BATCH: Final = 64

#: The longest pause between two tries of a reply that did not fit.
_REPLY_RETRY: Final = 0.05

#: A datagram's cost in a send buffer besides its bytes, asked for on top when the buffer
#: must grow for a large one.
_DATAGRAM_SLACK: Final = 64 * 1024


#: What tells one sender from another: its address; for a sender with none, its pid.
_Key = bytes | str | tuple[str, int]


def _key(address: bytes | str | None, cred: PeerCred | None) -> _Key:
    """A sender's key. An unbound sender arrives without an address (older kernels
    autobound it when the receiver had SO_PASSCRED; recent ones, 6.18 for one, leave it
    unbound): its process is all that tells two of them apart, so logger and socat, sending
    one after the other, are two senders, not one whose credentials change."""
    if address:
        return address
    return ("unbound", cred.pid if cred is not None else 0)


class _Sender:
    __slots__ = ("address", "cred", "id", "key", "last", "sock", "stalled")

    def __init__(self, conn_id: int, address: bytes | str, key: _Key, sock: socket.socket) -> None:
        self.id = conn_id
        self.address = address
        self.key = key
        self.sock = sock
        self.cred: PeerCred | None = None
        self.last = time.monotonic()
        #: A reply to it was dropped: its queue stayed full (it does not read).
        self.stalled = False


class DatagramRelay:
    def __init__(
        self,
        relay: socket.socket,
        server_sun_path: str,
        emit: Callable[[Event], None],
        server_gone: Callable[[], None],
    ) -> None:
        self._relay = relay
        self._server_path = server_sun_path
        self._emit = emit
        self._server_gone = server_gone
        self._me = Identity()
        self._senders: dict[_Key, _Sender] = {}
        self._max_senders = min(MAX_SENDERS, relays_that_fit(each=1) or MAX_SENDERS)
        self._by_fd: dict[int, _Sender] = {}
        self._next_id = 0
        self._closing_at: float | None = None
        self._wakeup = WakeUp()
        # SO_PASSCRED is on already: set where the socket was made, before it took PATH.
        relay.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="udskit-tap", daemon=True)

    @property
    def active(self) -> int:
        return len(self._senders)

    def start(self) -> None:
        self._thread.start()

    def stop_accepting(self, *, wait: bool = True) -> None:
        if self._closing_at is None:  # again (restore() waiting for it): only the wait
            self._closing_at = time.monotonic() + DRAIN_AFTER_RESTORE
            self._wakeup.wake()
        if wait:
            self._thread.join()

    def wait(self, timeout: float | None) -> bool:
        # Relaying ends with the loop, once it stopped accepting and the replies lingered.
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cut(self) -> None:
        pass

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._relay.fileno(), select.POLLIN)
        poller.register(self._wakeup.fd, select.POLLIN)
        try:
            while True:
                timeout = None
                if self._closing_at is not None:
                    left = self._closing_at - time.monotonic()
                    if left <= 0:
                        self._drain(poller)
                        return
                    timeout = int(left * 1000) + 1
                for fd, _ in poller.poll(timeout):
                    if fd == self._wakeup.fd:
                        self._wakeup.drain()
                    elif fd == self._relay.fileno():
                        self._from_clients(poller)
                    else:
                        sender = self._by_fd.get(fd)
                        if sender is not None:
                            self._from_server(sender, poller)
        finally:
            for sender in list(self._senders.values()):
                self._emit(Closed(sender.id, time.time(), None))
                sender.sock.close()
            self._senders.clear()
            self._relay.close()
            self._wakeup.close()

    def _drain(self, poller: select.poll) -> None:
        """Relay what is still queued for the relay, and replies for ``LINGER`` seconds."""
        self._from_clients(poller, until_empty=True)
        deadline = time.monotonic() + LINGER
        while self._by_fd:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(int(left * 1000) + 1):
                sender = self._by_fd.get(fd)
                if sender is not None:
                    self._from_server(sender, poller)

    def _from_clients(self, poller: select.poll, *, until_empty: bool = False) -> None:
        for _ in range(1 << 62 if until_empty else _CLIENT_BATCH):
            try:
                size = max(
                    1, self._relay.recv_into(bytearray(1), 0, socket.MSG_PEEK | socket.MSG_TRUNC)
                )
                data, ancdata, flags, address = self._relay.recvmsg(size, _ANCILLARY, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            try:
                received = unpack(ancdata, flags, "a datagram sender", MAX_FDS)
            except Exception as exc:  # noqa: BLE001 (ControlDataError: descriptors closed)
                self._emit(Refused(0, time.time(), None, str(exc)))
                continue
            try:
                self._forward(data, received.fds, received.cred, address, poller)
            finally:
                close_fds(received.fds)

    def _sender(self, address: bytes | str, key: _Key, poller: select.poll) -> _Sender:
        sender = self._senders.get(key)
        if sender is not None:
            sender.last = time.monotonic()
            return sender
        if len(self._senders) >= self._max_senders:
            oldest = min(self._senders.values(), key=lambda s: s.last)
            self._drop(oldest, poller)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            raw = address.encode() if isinstance(address, str) else address
            if raw and not _AUTOBOUND.match(raw):
                sock.bind(b"\0udskit-tap-%d-%d" % (os.getpid(), self._next_id + 1))
            sock.connect(self._server_path)  # from now on, only the server can send to it
        except BaseException:
            sock.close()
            raise
        self._next_id += 1
        sock.setblocking(False)  # waits for the server go through _to_server()
        sender = _Sender(self._next_id, address, key, sock)
        self._senders[key] = sender
        self._by_fd[sock.fileno()] = sender
        poller.register(sock.fileno(), select.POLLIN)
        return sender

    def _drop(self, sender: _Sender, poller: select.poll) -> None:
        poller.unregister(sender.sock.fileno())
        self._by_fd.pop(sender.sock.fileno(), None)
        self._senders.pop(sender.key, None)
        sender.sock.close()
        self._emit(Closed(sender.id, time.time(), None))

    def _forward(
        self,
        data: bytes,
        fds: list[int],
        cred: PeerCred | None,
        address: bytes | str,
        poller: select.poll,
    ) -> None:
        try:
            sender = self._sender(address, _key(address, cred), poller)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                self._server_gone()
            self._emit(Refused(0, time.time(), cred, f"cannot reach the server: {exc.strerror}"))
            return
        if sender.cred is None or cred != sender.cred:
            sender.cred = cred
            self._emit(Opened(sender.id, time.time(), cred, _shown(address)))
        ancillary = rights(fds, MAX_FDS)
        as_sender = self._me.uid == 0 and cred is not None
        if as_sender:
            assert cred is not None
            ancillary.append(_credentials(cred.pid, cred))
        elif cred is None or (cred.uid, cred.gid) != (self._me.uid, self._me.gid):
            who = (
                "a sender without credentials" if cred is None else f"uid {cred.uid} gid {cred.gid}"
            )
            self._emit(
                Refused(
                    sender.id,
                    time.time(),
                    cred,
                    f"datagram from {who} not relayed: the tap runs as uid {self._me.uid} and "
                    "would send it with its own rights; run the tap as root",
                )
            )
            return
        described = tuple(describe(fd) for fd in fds)
        self._emit(Data(sender.id, time.time(), "up", data, described))
        try:
            try:
                self._to_server(sender, data, ancillary)
            except ProcessLookupError:
                if not as_sender:
                    raise
                assert cred is not None
                # The sender has exited (a fire-and-forget sender often has by now), and
                # the kernel takes no credentials naming a pid that is gone (ESRCH). Its
                # uid and gid still go with the datagram; the pid becomes the tap's own.
                ancillary[-1] = _credentials(os.getpid(), cred)
                self._to_server(sender, data, ancillary)
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                self._server_gone()
            self._emit(Refused(sender.id, time.time(), cred, f"not delivered: {exc.strerror}"))

    def _to_server(
        self, sender: _Sender, data: bytes, ancillary: list[tuple[int, int, bytes]]
    ) -> None:
        """Send one datagram to the server, waiting while its queue is full (backpressure,
        as its clients would wait), but not past the tap's stop; TimeoutError then."""
        waiter: select.poll | None = None
        while True:
            try:
                _send_whole(sender.sock, data, ancillary)
                return
            except (BlockingIOError, InterruptedError):
                pass
            if waiter is None:  # only now: most datagrams go at the first try
                waiter = select.poll()
                waiter.register(sender.sock.fileno(), select.POLLOUT)
                waiter.register(self._wakeup.fd, select.POLLIN)
            timeout = None
            if self._closing_at is not None:
                left = self._closing_at + LINGER - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        errno.ETIMEDOUT, "the server did not read before the tap stopped"
                    )
                timeout = int(left * 1000) + 1
            for fd, _ in waiter.poll(timeout):
                if fd == self._wakeup.fd:
                    self._wakeup.drain()  # the loop reads _closing_at itself too

    def _to_client(
        self, sender: _Sender, data: bytes, ancillary: list[tuple[int, int, bytes]]
    ) -> None:
        """Send one reply to its client, waiting at most REPLY_WAIT for room in its queue
        (none for a client that did not read before); TimeoutError then."""
        deadline = time.monotonic() + (0.0 if sender.stalled else REPLY_WAIT)
        pause = 0.001
        while True:
            try:
                _send_whole(self._relay, data, ancillary, sender.address)
                sender.stalled = False
                return
            except (BlockingIOError, InterruptedError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                sender.stalled = True
                raise TimeoutError(
                    errno.ETIMEDOUT, "its client's queue is full (the client does not read)"
                )
            time.sleep(min(pause, left))  # no readiness to wait for: the client is not our peer
            pause = min(pause * 2, _REPLY_RETRY)

    def _from_server(self, sender: _Sender, poller: select.poll) -> None:
        sock = sender.sock
        while True:
            try:
                size = max(1, sock.recv_into(bytearray(1), 0, socket.MSG_PEEK | socket.MSG_TRUNC))
                data, ancdata, flags, _ = sock.recvmsg(size, _ANCILLARY, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(sender, poller)
                return
            try:
                fds = unpack(ancdata, flags, "the server", MAX_FDS).fds
            except Exception as exc:  # noqa: BLE001 (ControlDataError: descriptors closed)
                self._emit(Refused(sender.id, time.time(), None, str(exc)))
                continue
            described: tuple[PassedFd, ...] = tuple(describe(fd) for fd in fds)
            try:
                if sender.address:
                    self._emit(Data(sender.id, time.time(), "down", data, described))
                    self._to_client(sender, data, rights(fds, MAX_FDS))
                else:
                    self._emit(
                        Refused(sender.id, time.time(), None, "a reply to an unbound sender")
                    )
            except OSError as exc:
                self._emit(
                    Refused(sender.id, time.time(), None, f"reply not delivered: {exc.strerror}")
                )
            finally:
                close_fds(fds)


def _shown(address: bytes | str) -> str:
    if isinstance(address, str):
        return address
    if not address or _AUTOBOUND.match(address):
        return ""
    if address.startswith(b"\0"):
        return "@" + address[1:].decode(errors="backslashreplace")
    return os.fsdecode(address)


def _credentials(pid: int, cred: PeerCred) -> tuple[int, int, bytes]:
    """SCM_CREDENTIALS naming ``pid`` with the sender's uid and gid (only root may)."""
    return (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, UCRED.pack(pid, cred.uid, cred.gid))


def _send_whole(
    sock: socket.socket,
    data: bytes,
    ancillary: list[tuple[int, int, bytes]],
    address: bytes | str | None = None,
) -> None:
    """Send one datagram; if it is larger than our send buffer (EMSGSIZE), make room for
    it (its sender had) and send it again."""
    args = (0, address) if address is not None else ()
    try:
        sock.sendmsg([data], ancillary, *args)
    except OSError as exc:
        if exc.errno != errno.EMSGSIZE:
            raise
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + _DATAGRAM_SLACK)
        sock.sendmsg([data], ancillary, *args)
