"""Receivers whose socket has SO_PASSCRED set without udskit asking: an adopted descriptor,
or a connection accepted from a systemd listener with PassCredentials=yes (accepted sockets
inherit it). Every read then brings SCM_CREDENTIALS before any descriptors; the control
buffer must hold both, or the kernel cuts the credentials short and drops the descriptors."""

from __future__ import annotations

import os
import socket
import threading

import pytest

import udskit

from ..conftest import open_fds


def _passcred_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return ours, theirs


@pytest.mark.parametrize("max_fds", [0, 1, 2, 3, 16])
def test_a_channel_on_a_passcred_socket_reads_messages_and_descriptors(
    max_fds: int, no_fd_leak: None
) -> None:
    ours, theirs = _passcred_pair()
    with (
        udskit.Channel(ours, framing="length", max_fds=max_fds) as channel,
        udskit.Channel(theirs, framing="length", max_fds=16) as peer,
    ):
        peer.send(b"plain")
        assert channel.recv_fds() == (b"plain", [])
        if max_fds:
            r, w = os.pipe()
            try:
                peer.send_fds(b"with fds", [r] * max_fds)
            finally:
                os.close(r)
                os.close(w)
            data, fds = channel.recv_fds()
            try:
                assert data == b"with fds"
                assert len(fds) == max_fds
            finally:
                for fd in fds:
                    os.close(fd)
        peer.send(b"after")
        assert channel.recv() == b"after"


def test_a_message_server_on_a_passcred_listener_reads_descriptors(sockdir) -> None:  # type: ignore[no-untyped-def]
    path = str(sockdir / "s")
    got: list[tuple[bytes, int]] = []

    def handler(conn: udskit.Connection, message: bytes) -> bytes:
        got.append((message, len(conn.fds)))
        return b"ok"

    # max_fds=2: the credentials are larger than two descriptors' room
    server = udskit.MessageServer(path, handler, max_fds=2)
    server.listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    before = open_fds()
    try:
        with udskit.connect(path, framing="length") as client:
            r, w = os.pipe()
            try:
                client.send_fds(b"two", [r, w])
            finally:
                os.close(r)
                os.close(w)
            assert client.recv() == b"ok"
            client.send(b"none")
            assert client.recv() == b"ok"
    finally:
        server.stop()
        runner.join(10)
        server.close()
    assert not runner.is_alive()
    assert got == [(b"two", 2), (b"none", 0)]
    assert not open_fds() - before, "descriptors leaked"
