"""``udskit serve`` under systemd: notifications, the watchdog and the descriptor store.

With ``NOTIFY_SOCKET`` set (a ``Type=notify`` service), the server sends ``READY=1`` once it
listens, a ``STATUS=`` line saying what it serves, ``WATCHDOG=1`` pings from its serving loop
while ``WatchdogSec=`` asks for them, and ``STOPPING=1`` when it stops.

The descriptor store (``FileDescriptorStoreMax=``; ``FDSTORE`` in the environment, which
systemd 254 and later set themselves) keeps the listener across ``systemctl restart``: a
server that creates its socket stores it under a name derived from the address
(:func:`udskit.systemd.fdname_for`); the next start finds it in
``LISTEN_FDS``/``LISTEN_FDNAMES`` and serves it instead of claiming the path, so clients
that connect meanwhile wait in its backlog instead of failing. Its socket file is adopted
(:func:`udskit.sockfile.adopt` checks it is the very file that socket is bound to).

Who removes the file:

* stopped by a signal (``systemctl stop``, ``systemctl restart``, a crash): the server
  cannot tell a stop from a restart, so it leaves the file, and the socket, with systemd.
  After a restart the new server takes both; after a stop systemd closes its copy, the file
  is stale, and the next start reclaims it (a socket nobody listens on is removed safely);
* ended on its own (``--until``, ``--once``): the service is done; the socket leaves the
  store (``FDSTOREREMOVE=1``) and the file is removed, if it is still ours.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import udskit
from udskit import activation, systemd
from udskit.options import base_type, type_name
from udskit.sockfile import Claim, adopt

__all__ = ["Unit"]

log = logging.getLogger("udskit")


class Unit:
    """What ``udskit serve`` does for systemd; inert when ``NOTIFY_SOCKET`` is unset.

    Build it before the server: :attr:`listen_address` is where the server listens (the
    stored descriptor, when there is one). Then ``with unit.serving(server):`` around
    serving, with :attr:`finished` set when the server ended on its own.
    """

    def __init__(
        self,
        address: udskit.Address,
        type: str,  # noqa: A002
        mode: int,
        *,
        handover: bool = False,
    ) -> None:
        self.address = address
        self.finished = False
        self._type = type
        self._mode = mode
        self._notifier = systemd.Notifier()
        self._claim: Claim | None = None
        self._store = False  # store the listener once it listens
        self._stored = False  # the listener is in systemd's store
        #: The listener is the one systemd kept from the previous run.
        self.from_store = False
        self.fdname: str | None = None
        self.listen_address = address
        if not self._notifier.enabled or address.kind == "fd":
            return  # an inherited descriptor is its parent's (or systemd's) to keep
        if handover:
            return  # the socket passes from process to process (udskit upgrade), not via systemd
        self.fdname = systemd.fdname_for(address)
        kept = _stored(self.fdname)
        if kept is not None:
            self._check_kept(kept)
            self.listen_address = udskit.Address("fd", fd=kept)
            self.from_store = self._stored = True
        else:
            self._store = _store_size() > 0

    @contextmanager
    def serving(self, server: udskit.MessageServer) -> Iterator[Unit]:
        """Notify systemd around serving ``server``; see the module doc for the file."""
        notifier = self._notifier
        if not notifier.enabled:
            yield self
            return
        try:
            self._take(server)
            how = ", kept by systemd across the restart" if self.from_store else ""
            status = f"serving {self.address} ({self._type}{how})"
            upgrader = server.listener.upgrader
            if upgrader is None:
                notifier.ready(status=status)
            else:
                _hand_over_as_main(notifier, upgrader, status)
            with notifier.watchdog_thread(via=server.call_soon):
                try:
                    yield self
                finally:
                    if upgrader is None or not upgrader.handed_over:
                        notifier.stopping()  # (after a handover, the service goes on)
                    self._leave()
        finally:
            notifier.close()

    def _check_kept(self, fd: int) -> None:
        """The stored descriptor must still be what this server serves (--type may have
        changed since it was stored); if not, it leaves the store and the start fails."""
        found = _socket_type(fd)
        if found == self._type:
            return
        assert self.fdname is not None
        self._notifier.remove_fd(self.fdname)
        self._notifier.close()
        what = "not a socket udskit serves" if found is None else f"a {found} socket"
        raise udskit.SocketFileError(
            f"cannot serve {self.address} as type='{self._type}': the socket systemd kept "
            f"for it (FDNAME={self.fdname}) is {what}; it is now dropped from the store: "
            "start the service again"
        )

    def _take(self, server: udskit.MessageServer) -> None:
        """Own the listener's file here (:meth:`_leave` decides its fate at the stop), and
        store a new listener in systemd's store."""
        listener = server.listener
        if self._store:
            assert self.fdname is not None
            self._stored = self._notifier.store_fd(listener.fileno(), self.fdname)
        if not self._stored:
            return
        if self.address.kind == "path":
            self._claim = (
                self._adopt_file(listener.socket)
                if self.from_store
                else adopt(listener.socket, self.address)
            )
        # The server closes its listener as soon as it stops, before _leave: from now on
        # the file is removed (or left) by _leave, not by the listener, and closing the
        # listener must not shut down the socket that systemd's copy keeps listening.
        listener.disown()

    def _adopt_file(self, sock: socket.socket) -> Claim:
        assert self.fdname is not None
        try:
            claim = adopt(sock, self.address)
        except udskit.SocketFileError:
            self._notifier.remove_fd(self.fdname)
            raise udskit.SocketFileError(
                f"cannot serve {self.address}: the file at the path is not the socket systemd "
                f"kept for it (FDNAME={self.fdname}); it was removed or replaced since: the kept "
                "socket is now dropped from the store: start the service again"
            ) from None
        try:
            found = os.stat(self.address.raw, follow_symlinks=False)
        except OSError:
            return claim
        if stat.S_IMODE(found.st_mode) != self._mode:
            log.warning(
                "%s keeps mode %04o from its first start, not --mode %04o: the socket comes "
                "from systemd's descriptor store; stop the service (not restart) to apply it",
                self.address,
                stat.S_IMODE(found.st_mode),
                self._mode,
            )
        return claim

    def _leave(self) -> None:
        claim = self._claim  # set only for a stored listener (see _take)
        if not self._stored:
            return  # the listener removes its own file when it closes
        assert self.fdname is not None
        if self.finished:
            if claim is not None:
                # First: systemd's copy, the last open one, keeps the file's inode, which
                # the claim checks the file by (see Claim); FDSTOREREMOVE may free it.
                claim.release()
            self._notifier.remove_fd(self.fdname)
        elif claim is not None:
            claim.disown()  # systemd keeps the socket, and the file stays its way in


def _hand_over_as_main(notifier: systemd.Notifier, upgrader: udskit.Upgrader, status: str) -> None:
    """A server that hands its listener over (``--handover``) is the service's main process
    while it serves: a successor becomes the main process once it has taken over (before
    that, a successor that fails must not have told systemd anything), and the old one
    says so too, as systemd takes MAINPID= from the main process alone unless the unit
    says NotifyAccess=all."""
    upgrader.ready()  # the predecessor, if any, has stopped accepting when this returns
    if upgrader.previous_pid is None:
        notifier.ready(status=status)
    else:
        if "WATCHDOG_PID" in os.environ:
            # systemd set it to the main process it started: that is us now, and the
            # watchdog pings are ours to send.
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        notifier.send(
            {
                "MAINPID": os.getpid(),
                "READY": 1,
                "STATUS": systemd.status_text(
                    f"{status}, taken over from pid {upgrader.previous_pid}"
                ),
            }
        )

    def handed_over() -> None:
        successor = upgrader.successor_pid
        assert successor is not None
        notifier.send(
            {"MAINPID": successor, "STATUS": systemd.status_text(f"handed over to pid {successor}")}
        )

    upgrader.on_handed_over(handed_over)


def _stored(name: str) -> int | None:
    """The descriptor systemd passed under ``name``, if it passed one to this process."""
    for entry in activation.inherited():
        if entry.name == name:
            return entry.fd
    return None


def _socket_type(fd: int) -> str | None:
    """The type of socket ``fd`` is (stream, seqpacket, dgram), None if not such a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return type_name(base_type(sock))
    except ValueError:
        return None
    finally:
        sock.detach()


def _store_size() -> int:
    """``FDSTORE``: how many descriptors the unit's store holds (FileDescriptorStoreMax=).
    systemd 254 and later set it; with an older systemd, set it in the unit
    (``Environment=FDSTORE=1``) to use the store."""
    text = os.environ.get("FDSTORE", "")
    return int(text) if text.isascii() and text.isdigit() else 0
