"""Connecting to the server on a client's behalf, with that client's credentials, never more.

The server sees the relay as its peer: SO_PEERCRED holds the credentials of whoever called
connect(), and access checks (the socket file's mode, a server's own uid/gid policy) judge
those. So the relay must connect as the client did:

* the client has exactly our credentials (uid, gid, groups): connect ourselves;
* we run as root: a *connector* process connects with the client's effective uid, gid and
  supplementary groups and passes the connected socket back (SCM_RIGHTS);
* otherwise the client is refused: connecting as ourselves would give it our rights.

Why a separate process: Linux keeps credentials per thread, but glibc's setresuid() and
setgroups() apply them to every thread of the process (the setxid broadcast), so the relay
cannot take on one client's identity in one thread while others relay. Forking a child per
connection would work but costs a fork of the whole interpreter per client (about 1 ms,
against about 40 us for a request to a connector: see docs/tap.md); so one connector is
forked when the tap starts, before any relay thread exists. It switches only its effective
ids (the saved uid stays 0, so it can switch back), connects without waiting, switches back,
and exits if switching back ever fails. Its pid is what the server sees as the peer's pid.
The connector reaches the server's socket by its tapped name relative to the directory,
and the relay checks that each connection reached the server it tapped (SO_PEERCRED).
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import struct
import threading
import warnings
from typing import Final

from ..ancillary import ancillary_size, close_fds
from ..creds import PeerCred

__all__ = ["Connector", "Identity", "may_connect_as_self"]

#: One request: uid, gid, socket type, number of groups; the groups follow.
_REQUEST: Final = struct.Struct("=iiii")
#: One answer: connect()'s errno (0: the socket comes with it).
_ANSWER: Final = struct.Struct("=i")
#: Groups a request carries at most: SO_PEERGROUPS reports up to 256 (see creds.py).
_MAX_GROUPS: Final = 256
#: How long the relay waits for the connector's answer: it connects without waiting, so
#: it answers within microseconds; this only bounds a connector that died.
_ANSWER_TIMEOUT: Final = 10.0


class Identity:
    """Our own effective credentials, as the kernel would record them at connect()."""

    __slots__ = ("gid", "groups", "uid")

    def __init__(self) -> None:
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.groups = frozenset(os.getgroups())


def may_connect_as_self(me: Identity, client: PeerCred) -> bool:
    """Whether connecting as ourselves gives the server no more than the client had: same
    uid and gid, and no group the client lacks."""
    if client.uid != me.uid or client.gid != me.gid:
        return False
    return me.groups <= {client.gid, *client.groups}


class Connector:
    """The forked connector (see the module docstring) and the relay's end of its channel."""

    __slots__ = ("_channel", "_lock", "pid")

    def __init__(self, directory_fd: int, name: bytes) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with warnings.catch_warnings():
            # 3.12+ warns about fork() in a threaded process: the child takes no lock that
            # another thread could hold (no imports, logging or buffered I/O), only system
            # calls on objects made before the fork, then os._exit().
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                # Only what the connector needs stays open: a copy of any other descriptor
                # (the relay's sockets, the caller's own) would keep it alive after its
                # owner closed it, and a peer would never see the end of its connection.
                os.fchdir(directory_fd)
                keep = sorted({child.fileno(), 0, 1, 2})
                for low, high in itertools.pairwise([*keep, os.sysconf("SC_OPEN_MAX")]):
                    os.closerange(low + 1, high)
                _serve(child, name)
                code = 0
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self._channel = parent
        self._channel.settimeout(_ANSWER_TIMEOUT)
        self._lock = threading.Lock()

    def connect(self, client: PeerCred, kind: int) -> socket.socket:
        """A socket connected to the server as ``client``; OSError with connect()'s errno."""
        groups = client.groups[:_MAX_GROUPS]
        request = (
            _REQUEST.pack(client.uid, client.gid, kind, len(groups))
            + array.array("i", groups).tobytes()
        )
        with self._lock:
            self._channel.sendall(request)
            data, ancdata, _, _ = self._channel.recvmsg(
                _ANSWER.size, ancillary_size(1), socket.MSG_CMSG_CLOEXEC
            )
        fds = [
            fd
            for level, kind_, payload in ancdata
            if level == socket.SOL_SOCKET and kind_ == socket.SCM_RIGHTS
            for fd in array.array("i", payload[: len(payload) - len(payload) % 4])
        ]
        if len(data) != _ANSWER.size:
            close_fds(fds)
            raise ConnectionError(errno.EPIPE, "the tap's connector process is gone")
        (code,) = _ANSWER.unpack(data)
        if code != 0 or len(fds) != 1:
            close_fds(fds)
            raise OSError(code or errno.EPROTO, os.strerror(code or errno.EPROTO))
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        """End the connector (it exits when its channel closes) and reap it."""
        self._channel.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(channel: socket.socket, name: bytes) -> None:
    """The connector's loop: one request, one answer, until the channel closes."""
    groups = os.getgroups()
    while True:
        request = channel.recv(_REQUEST.size + 4 * _MAX_GROUPS)
        if len(request) < _REQUEST.size:
            return  # the tap closed the channel (or died)
        uid, gid, kind, count = _REQUEST.unpack_from(request)
        wanted = list(array.array("i", request[_REQUEST.size : _REQUEST.size + 4 * count]))
        sock = None
        try:
            os.setgroups(wanted)
            os.setresgid(-1, gid, -1)
            os.setresuid(-1, uid, -1)
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            code = sock.connect_ex(name)
        except OSError as exc:
            code = exc.errno or errno.EPERM
        finally:
            # Back to root before anything else; if that fails, never serve another request.
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
            os.setgroups(groups)
        try:
            if code == 0 and sock is not None:
                sock.setblocking(True)
                channel.sendmsg(
                    [_ANSWER.pack(0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))],
                )
            else:
                channel.sendall(_ANSWER.pack(code))
        finally:
            if sock is not None:
                sock.close()
