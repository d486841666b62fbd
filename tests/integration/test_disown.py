"""Listener.disown(): the socket file and the socket itself outlive this process's copy,
for a listener that systemd's descriptor store (or another process) keeps open."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

import udskit
import udskit.aio


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_a_disowned_listener_leaves_file_and_socket(sockdir: Path, kind: str) -> None:
    path = sockdir / "kept.sock"
    listener = udskit.listen(path, type=kind)
    kept = os.dup(listener.fileno())  # the copy another process holds
    inode = os.stat(path).st_ino
    listener.disown()
    listener.close()
    try:
        assert os.stat(path).st_ino == inode  # the file stays
        types = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}
        with socket.socket(socket.AF_UNIX, types.get(kind, socket.SOCK_DGRAM)) as client:
            # and the socket still works for the other copy: close() did not shut it down
            client.connect(os.fspath(path))
            client.send(b"still there")
            other = socket.socket(fileno=kept)
            kept = -1
            with other:
                if kind == "dgram":
                    assert other.recv(64) == b"still there"
                else:
                    conn, _ = other.accept()
                    with conn:
                        assert conn.recv(64) == b"still there"
    finally:
        if kept >= 0:
            os.close(kept)
    assert path.exists()  # nobody removes it: the next owner reclaims it as stale


def test_the_asyncio_listener_disowns_too(sockdir: Path) -> None:
    path = sockdir / "kept.sock"

    async def main() -> None:
        listener = await udskit.aio.listen(path)
        listener.disown()
        listener.close()

    asyncio.run(main())
    assert path.exists()
    with udskit.listen(path):  # stale now: reclaimed
        pass
    assert not path.exists()
