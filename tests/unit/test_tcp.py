"""``udskit.tcp``: the blocking TCP connect and the options every udskit TCP connection gets,
checked on what each API (blocking, asyncio, the bridge) hands out."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

import udskit
import udskit.aio
from udskit import bridge
from udskit.address import Address
from udskit.tcp import connect_tcp, open_tcp, tcp_options


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


def _dead_then(live: socket.socket, monkeypatch: pytest.MonkeyPatch) -> Address:
    """A target whose host resolves to a closed port first, then to ``live``'s, as
    ``localhost`` does when it names ::1 before 127.0.0.1 and only one of them listens."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead_port = closed.getsockname()[1]
    live_port = live.getsockname()[1]
    tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")

    def resolve(host: object, port: object, *args: object, **kwargs: object) -> list[object]:
        assert host == "two-addresses.test"
        return [(*tcp, ("127.0.0.1", dead_port)), (*tcp, ("127.0.0.1", live_port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)  # asyncio's resolver calls it
    return Address.parse(f"tcp:two-addresses.test:{live_port}")


def test_open_tcp_tries_every_address_until_one_accepts(
    server: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _dead_then(server, monkeypatch)
    prepared: list[socket.socket] = []

    async def main() -> tuple[bool, bool]:
        sock = await open_tcp(target, 5.0, prepare=prepared.append)
        with sock:
            return _nodelay(sock), sock.getblocking()

    assert asyncio.run(main()) == (True, False)
    assert len(prepared) == 2  # each attempt's socket was prepared before it connected
    assert all(sock.fileno() == -1 for sock in prepared)  # the failed one was closed


def test_open_tcp_raises_the_last_error_untranslated() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        target = _target(closed)
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(open_tcp(target, 5.0))


def test_the_asyncio_api_tries_every_address(
    server: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to try only the first address, where the blocking API and the bridge try all.
    target = _dead_then(server, monkeypatch)

    async def main() -> bytes:
        async with await udskit.aio.connect(str(target), framing="raw", timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                accepted.sendall(b"hello")
                return bytes(await client.recv())

    assert asyncio.run(main()) == b"hello"


# -- errors, as each API raises them ----------------------------------------------------------
def _unresolvable(monkeypatch: pytest.MonkeyPatch) -> str:
    def resolve(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)  # create_connection's and asyncio's
    return "tcp:nowhere.invalid:80"


_NOT_RESOLVED = r"cannot connect to tcp:nowhere\.invalid:80: cannot resolve 'nowhere\.invalid': "


def test_an_unresolvable_host_is_named_by_the_blocking_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It used to say "unknown error -2": os.strerror() of getaddrinfo's EAI_NONAME.
    with pytest.raises(udskit.ConnectError, match=_NOT_RESOLVED + "Name or service not known"):
        udskit.connect(_unresolvable(monkeypatch), timeout=5)


def test_an_unresolvable_host_is_named_by_the_asyncio_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = _unresolvable(monkeypatch)
    with pytest.raises(udskit.ConnectError, match=_NOT_RESOLVED):
        asyncio.run(udskit.aio.connect(target, timeout=5))


def test_an_unresolvable_host_is_named_by_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    target = Address.parse(_unresolvable(monkeypatch))
    with pytest.raises(udskit.ConnectError, match=_NOT_RESOLVED):
        asyncio.run(bridge.connect_socket(target))


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """A TCP listener that never accepts, its backlog filled: the kernel drops further SYNs,
    so a connect waits until its timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued = []
        try:
            for _ in range(4):
                sock = socket.socket()
                queued.append(sock)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(listener.getsockname())
            yield f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        finally:
            for sock in queued:
                sock.close()


def test_a_blocking_connect_that_times_out_raises_timeout(full_backlog: str) -> None:
    # It used to raise ConnectError("...: success"): a timeout has no errno.
    with pytest.raises(udskit.Timeout, match=r"connect on tcp:127\.0\.0\.1:[0-9]+ timed out"):
        udskit.connect(full_backlog, timeout=0.2)


def test_an_asyncio_connect_that_times_out_raises_timeout(full_backlog: str) -> None:
    with pytest.raises(udskit.Timeout, match=r"connect on tcp:127\.0\.0\.1:[0-9]+ timed out"):
        asyncio.run(udskit.aio.connect(full_backlog, timeout=0.2))
