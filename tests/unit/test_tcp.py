"""``udskit.tcp``: the blocking TCP connect and the options every udskit TCP connection gets,
checked on what each API (blocking, asyncio, the bridge) hands out."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

import udskit
import udskit.aio
from udskit import bridge
from udskit.address import Address
from udskit.tcp import connect_tcp, tcp_options


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A TCP listener on a loopback port the kernel chose."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def _target(listener: socket.socket) -> Address:
    return Address.parse(f"tcp:127.0.0.1:{listener.getsockname()[1]}")


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_tcp_options_turn_nagle_off() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert not _nodelay(sock)
        tcp_options(sock)
        assert _nodelay(sock)


def test_connect_tcp_connects_with_the_options_and_the_timeout(server: socket.socket) -> None:
    with connect_tcp(_target(server), 5.0) as sock:
        accepted, _ = server.accept()
        with accepted:
            assert _nodelay(sock)
            assert sock.gettimeout() == 5.0
            sock.sendall(b"ping")
            assert accepted.recv(4) == b"ping"


def test_connect_tcp_raises_the_os_error_untranslated() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        target = _target(closed)
    with pytest.raises(ConnectionRefusedError):
        connect_tcp(target, 5.0)


def test_the_blocking_api_hands_out_nodelay_sockets(server: socket.socket) -> None:
    with udskit.connect(str(_target(server)), timeout=5) as channel:
        assert _nodelay(channel.socket)


def test_the_asyncio_api_hands_out_nodelay_sockets(server: socket.socket) -> None:
    async def main() -> bool:
        async with await udskit.aio.connect(str(_target(server)), timeout=5) as channel:
            return _nodelay(channel.socket)

    assert asyncio.run(main())


def test_the_bridge_connects_upstream_with_nodelay(server: socket.socket) -> None:
    async def main() -> bool:
        sock = await bridge.connect_socket(_target(server))
        with sock:
            return _nodelay(sock)

    assert asyncio.run(main())
