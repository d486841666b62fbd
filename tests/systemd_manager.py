"""A notification socket read the way systemd reads it, for the tests of udskit.systemd and
of ``udskit serve`` under systemd.

systemd (src/core/manager.c, manager_dispatch_notify_fd) binds an AF_UNIX datagram socket,
sets SO_PASSCRED on it, and for each datagram: takes the sender's pid from SCM_CREDENTIALS
(a datagram without it is refused), takes descriptors from SCM_RIGHTS (only with FDSTORE=1
are they kept), refuses a truncated datagram (MSG_TRUNC) or control data (MSG_CTRUNC), and
splits the text into NAME=value lines. NotifyAccess=main accepts a message only from the
main pid: :meth:`NotifySocket.receive` checks that ``pid`` when given one.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: systemd's NOTIFY_BUFFER_MAX: the largest notification it reads.
NOTIFY_BUFFER_MAX = 4096

#: systemd's NOTIFY_FD_MAX: descriptors it takes with one notification.
NOTIFY_FD_MAX = 768

#: Bound on waiting for one notification.
NOTIFY_TIMEOUT = 20.0


@dataclass
class Notification:
    """One datagram as systemd parses it."""

    fields: dict[str, str]
    pid: int
    uid: int
    gid: int
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self, path: Path | str) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if self.path.startswith("@"):
            self.sock.bind(b"\0" + self.path[1:].encode())
        else:
            self.sock.bind(self.path)

    def receive(self, pid: int | None = None, timeout: float = NOTIFY_TIMEOUT) -> Notification:
        """The next notification; with ``pid``, it must come from that process."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no notification arrived in time"
        fdsize = array.array("i").itemsize
        space = socket.CMSG_SPACE(NOTIFY_FD_MAX * fdsize) + socket.CMSG_SPACE(12)
        data, ancdata, flags, _ = self.sock.recvmsg(
            NOTIFY_BUFFER_MAX, space, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
        )
        fds: list[int] = []
        cred: tuple[int, int, int] | None = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fdsize
                fds.extend(array.array("i", payload[:usable]))
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                cred = struct.unpack("3i", payload[:12])
        got = Notification({}, 0, 0, 0, fds)
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), "notification truncated"
        assert cred is not None, "a notification without credentials (systemd refuses it)"
        got.pid, got.uid, got.gid = cred
        if pid is not None:
            assert got.pid == pid, f"notification from pid {got.pid}, not the main pid {pid}"
        for line in data.decode("utf-8").split("\n"):
            if line:
                name, sep, value = line.partition("=")
                assert sep, f"not NAME=value: {line!r}"
                got.fields[name] = value
        if fds and got.fields.get("FDSTORE") != "1":
            got.close()  # systemd closes descriptors that came without FDSTORE=1
            raise AssertionError("descriptors sent without FDSTORE=1")
        return got

    def receive_until(self, name: str, pid: int | None = None) -> list[Notification]:
        """Notifications up to and including the first with ``name`` (bounded)."""
        seen = []
        for _ in range(1000):
            got = self.receive(pid)
            seen.append(got)
            if name in got.fields:
                return seen
        raise AssertionError(f"no {name}= among 1000 notifications")

    def pending(self) -> bool:
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notify_socket(path: Path | str) -> Iterator[NotifySocket]:
    receiver = NotifySocket(path)
    try:
        yield receiver
    finally:
        receiver.close()


#: What a service manager does between fork() and exec(): the passed descriptors become
#: 3, 4, ... and LISTEN_PID is the service's own pid (known only in the child).
_EXEC_SERVICE = """
import fcntl, os, sys
fds = [int(n) for n in sys.argv[1].split(",") if n]
# Close-on-exec copies above any number in use, out of the way of 3, 4, ...
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256) for fd in fds]
for fd in fds:
    os.close(fd)
for number, fd in enumerate(moved, 3):
    os.dup2(fd, number)  # inheritable
if fds:
    os.environ.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
    )
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def start_service(
    args: list[str],
    env: dict[str, str],
    passed: list[tuple[int, str]] = (),  # type: ignore[assignment]
) -> subprocess.Popen[bytes]:
    """Start ``python ARGS`` as systemd starts a service: with ``passed`` (descriptor, name)
    pairs as LISTEN_FDS/LISTEN_FDNAMES; stdout and stderr piped. The pid is the service's."""
    fds = [fd for fd, _ in passed]
    names = ":".join(name for _, name in passed)
    return subprocess.Popen(
        [sys.executable, "-c", _EXEC_SERVICE, ",".join(map(str, fds)), names, *args],
        env=env,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
