"""Servers for the tap's tests, written with plain sockets (not udskit), each in a thread:
an echo server for stream and seqpacket sockets, a datagram echo, and servers that answer
with the credentials they see or keep the descriptors they receive.

Every server binds its own socket in a test's directory and is stopped by the test
(shutdown wakes its threads; joins are bounded)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..conftest import READY_TIMEOUT

TYPES = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}

#: ``struct ucred``: pid, uid, gid.
UCRED = struct.Struct("3i")


class Server:
    """A listening socket and a thread per client running ``handle(conn)``."""

    def __init__(
        self,
        path: Path,
        handle: Callable[[socket.socket], None],
        kind: str = "stream",
        mode: int = 0o600,
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, TYPES[kind])
        self.sock.bind(str(path))
        os.chmod(path, mode)
        self.sock.listen(128)
        self.inode = os.stat(path).st_ino
        self._handle = handle
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handle(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._accepting.join(READY_TIMEOUT)
        for thread in self._threads:
            thread.join(READY_TIMEOUT)


def echo(conn: socket.socket) -> None:
    """Send back every read (a stream) or message (seqpacket) until end of stream."""
    packets = conn.type == socket.SOCK_SEQPACKET
    if packets:  # room to send back what a client with a large buffer sent
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    while True:
        size = conn.recv_into(bytearray(1), 0, socket.MSG_PEEK | socket.MSG_TRUNC) if packets else 0
        data = conn.recv(max(size, 1) if packets else 65536)
        if not data:
            return
        conn.sendall(data)


def tell_creds(conn: socket.socket) -> None:
    """Answer one line: the peer's pid, uid and gid as SO_PEERCRED reports them."""
    pid, uid, gid = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    conn.sendall(f"{pid} {uid} {gid}\n".encode())


def keep_fds(store: list[list[int]]) -> Callable[[socket.socket], None]:
    """A handler that receives one message with descriptors, keeps them, and answers how
    many came."""

    def handle(conn: socket.socket) -> None:
        data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        store.append(fds)
        conn.sendall(b"%d %s" % (len(fds), data))

    return handle


@contextlib.contextmanager
def server(
    path: Path, handle: Callable[[socket.socket], None] = echo, kind: str = "stream", **kw: int
) -> Iterator[Server]:
    running = Server(path, handle, kind, **kw)
    try:
        yield running
    finally:
        running.close()


class DatagramEcho:
    """A bound datagram socket that sends every datagram back to its sender (when it has
    an address) and records (data, sender address, credentials) of each."""

    def __init__(self, path: Path, mode: int = 0o666) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # large replies
        self.sock.bind(str(path))
        os.chmod(path, mode)
        self.seen: list[tuple[bytes, object, tuple[int, int, int] | None]] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                size = self.sock.recv_into(bytearray(1), 0, socket.MSG_PEEK | socket.MSG_TRUNC)
                data, ancdata, _, address = self.sock.recvmsg(
                    max(size, 1), socket.CMSG_SPACE(UCRED.size)
                )
            except OSError:
                return
            if not data and not address:
                return  # close() shut the socket down
            cred = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    cred = UCRED.unpack(payload[: UCRED.size])
            with self._changed:
                self.seen.append((data, address, cred))
                self._changed.notify_all()
            if address:
                with contextlib.suppress(OSError):
                    self.sock.sendto(data.upper(), address)

    def wait_seen(self, count: int) -> None:
        """Return once ``count`` datagrams have arrived (bounded)."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.seen) >= count, READY_TIMEOUT)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the receiving thread
        self._thread.join(READY_TIMEOUT)
        self.sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError(f"end of stream with {size} bytes still expected")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
