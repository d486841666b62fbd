"""``udskit.aio.Server``, ``start_server`` and ``serve``: a task per connection, a call per
datagram, ``max_clients``, failures in handlers and in accept(), and a clean stop (by
``stop()`` or by SIGINT/SIGTERM) that removes the socket file."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import AddressInUse, ConnectionClosed

from ..conftest import READY_TIMEOUT, wait_connectable
from .helpers import idle_turns, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


async def upper(channel: udskit.aio.Channel) -> None:
    async for message in channel:
        await channel.send(message.upper())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_one_handler_serves_every_type(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "upper.sock"

    async def main() -> None:
        server = await udskit.aio.start_server(path, upper, type=kind)
        serving = asyncio.ensure_future(server.serve_forever())

        async def client(number: int) -> bytes:
            async with await udskit.aio.connect(path, type=kind) as channel:
                await channel.send(b"client %d" % number)
                return await channel.recv()

        replies = await asyncio.gather(*(client(n) for n in range(5)))
        assert replies == [b"CLIENT %d" % n for n in range(5)]
        server.stop()
        await serving
        assert not path.exists()
        with pytest.raises(RuntimeError, match="once per Server"):
            await server.serve_forever()

    arun(main())


def test_datagram_session(arun: Run, sockdir: Path) -> None:
    path = sockdir / "dgram.sock"
    seen: list[tuple[bytes, udskit.PeerCred | None, str]] = []

    async def handler(session: udskit.aio.Channel) -> None:
        data = await session.recv()
        seen.append((data, session.peer, str(session.address)))
        await session.send(b"got " + data)
        with pytest.raises(ConnectionClosed, match="no more datagrams in this session"):
            await session.recv()

    async def main() -> None:
        async with await udskit.aio.start_server(path, handler, type="dgram") as server:
            serving = asyncio.ensure_future(server.serve_forever())
            async with await udskit.aio.connect(path, type="dgram") as client:
                await client.send(b"one")
                assert await client.recv() == b"got one"
                own = client.socket.getsockname()
            server.stop()
            await serving
        assert seen == [(b"one", udskit.PeerCred(os.getpid(), os.getuid(), os.getgid()), own)]

    arun(main())


def test_max_clients_holds_the_next_one_back(arun: Run, sockdir: Path) -> None:
    path = sockdir / "one.sock"
    served: list[bytes] = []
    release = asyncio.Event()

    async def handler(channel: udskit.aio.Channel) -> None:
        name = await channel.recv()
        served.append(name)
        if name == b"first":
            await release.wait()
        await channel.send(b"bye " + name)

    async def main() -> None:
        async with await udskit.aio.start_server(path, handler, max_clients=1) as server:
            serving = asyncio.ensure_future(server.serve_forever())
            first = await udskit.aio.connect(path)
            await first.send(b"first")
            await turns_until(lambda: served == [b"first"])
            second = await udskit.aio.connect(path)  # waits in the kernel's backlog
            await second.send(b"second")
            await idle_turns()
            assert served == [b"first"]
            assert server.active_clients == 1
            release.set()
            assert await first.recv() == b"bye first"
            assert await second.recv() == b"bye second"
            assert served == [b"first", b"second"]
            first.close()
            second.close()
            server.stop()
            await serving

    arun(main())


def test_a_failing_handler_is_logged_and_serving_goes_on(
    arun: Run, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "flaky.sock"

    async def handler(channel: udskit.aio.Channel) -> None:
        message = await channel.recv()
        if message == b"crash":
            raise ValueError("handler bug")
        await channel.send(message)

    async def main() -> None:
        with caplog.at_level(logging.ERROR, logger="udskit"):
            async with await udskit.aio.start_server(path, handler) as server:
                serving = asyncio.ensure_future(server.serve_forever())
                async with await udskit.aio.connect(path) as crasher:
                    await crasher.send(b"crash")
                    with pytest.raises(ConnectionClosed):
                        await crasher.recv()  # its channel was closed after the failure
                async with await udskit.aio.connect(path) as client:
                    await client.send(b"still here")
                    assert await client.recv() == b"still here"
                server.stop()
                await serving
        assert "handler failed" in caplog.text
        assert "ValueError: handler bug" in caplog.text

    arun(main())


def test_stop_ends_the_clients_handlers(
    arun: Run, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sockdir / "stopping.sock"
    ended: list[str] = []
    monkeypatch.setattr(udskit.aio.server, "SHUTDOWN_GRACE", 0.05)

    async def polite(channel: udskit.aio.Channel) -> None:
        async for _ in channel:
            pass
        ended.append("polite: saw the end")

    async def stubborn(channel: udskit.aio.Channel) -> None:
        try:
            await asyncio.Event().wait()  # ignores its connection
        except asyncio.CancelledError:
            ended.append("stubborn: cancelled")
            raise

    async def main() -> None:
        for handler in (polite, stubborn):
            server = await udskit.aio.start_server(path, handler)
            serving = asyncio.ensure_future(server.serve_forever())
            client = await udskit.aio.connect(path)
            await turns_until(lambda: server.active_clients == 1)  # noqa: B023
            server.stop()
            await serving
            assert server.active_clients == 0
            with pytest.raises(ConnectionClosed):
                await client.recv()
            client.close()
        assert ended == ["polite: saw the end", "stubborn: cancelled"]

    arun(main())


def test_stop_cancels_a_stuck_datagram_handler(
    arun: Run, sockdir: Path, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """A datagram handler that never ends gets the grace period and is cancelled, as a
    connection's is; serve_forever() waited for it forever."""
    path = sockdir / "stuck-dgram.sock"
    monkeypatch.setattr(udskit.aio.server, "SHUTDOWN_GRACE", 0.05)
    ended: list[str] = []
    handling = asyncio.Event()

    async def stubborn(channel: udskit.aio.Channel) -> None:
        await channel.recv()
        handling.set()
        try:
            await asyncio.Event().wait()  # a backend that never answers
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async def main() -> None:
        server = await udskit.aio.start_server(path, stubborn, type="dgram")
        serving = asyncio.ensure_future(server.serve_forever())
        async with await udskit.aio.connect(path, type="dgram") as client:
            await client.send(b"hello")
            await handling.wait()
            server.stop()
            done, _ = await asyncio.wait({serving}, timeout=READY_TIMEOUT)
            assert done, "serve_forever() did not return after stop()"
            await serving
        assert ended == ["cancelled"]
        assert server.active_clients == 0
        assert not path.exists()

    arun(main())


def test_stop_lets_a_running_datagram_handler_reply(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """stop() takes no new datagram and removes the socket file at once, but a handler
    already running still replies through the socket; its reply was lost (the socket was
    closed under it) and the client waited forever."""
    path = sockdir / "late-reply.sock"
    handling, go_on = asyncio.Event(), asyncio.Event()

    async def slow(channel: udskit.aio.Channel) -> None:
        data = await channel.recv()
        handling.set()
        await go_on.wait()  # a backend that answers after stop()
        await channel.send(b"late " + data)

    async def main() -> None:
        server = await udskit.aio.start_server(path, slow, type="dgram")
        serving = asyncio.ensure_future(server.serve_forever())
        async with await udskit.aio.connect(path, type="dgram") as client:
            await client.send(b"question")
            await handling.wait()
            server.stop()
            assert not path.exists(), "stop() left the socket file for new senders"
            go_on.set()
            client.settimeout(READY_TIMEOUT)
            assert await client.recv() == b"late question"
            await serving
        assert server.active_clients == 0
        assert server.listener.closed

    arun(main())


def test_async_with_waits_for_serve_forever_in_another_task(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """Leaving ``async with server`` stops it and returns once everything is released: the
    handlers have seen their connections end, serve_forever() has returned. It returned at
    once, with the handlers still running (as the message server does not)."""
    path = sockdir / "with.sock"
    ended: list[str] = []

    async def echo(channel: udskit.aio.Channel) -> None:
        async for message in channel:
            await channel.send(message)
        ended.append("saw the end")

    async def main() -> None:
        async with await udskit.aio.start_server(path, echo) as server:
            serving = asyncio.ensure_future(server.serve_forever())
            client = await udskit.aio.connect(path)
            await client.send(b"ping")
            assert await client.recv() == b"ping"
        assert serving.done()
        assert ended == ["saw the end"]
        assert server.active_clients == 0
        await serving
        client.close()

    arun(main())


def test_out_of_descriptors_on_accept_backs_off(
    arun: Run, sockdir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE leaves the connection queued: the server pauses, never spins, then serves."""
    path = sockdir / "emfile.sock"

    async def main() -> None:
        real = udskit.aio.Listener.accept_socket
        failures = 0

        async def exhausted(listener: udskit.aio.Listener) -> Any:
            nonlocal failures
            if failures < 2:
                failures += 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await real(listener)

        monkeypatch.setattr(udskit.aio.Listener, "accept_socket", exhausted)
        server = await udskit.aio.start_server(path, upper)
        with caplog.at_level(logging.WARNING, logger="udskit"):
            async with server:
                serving = asyncio.ensure_future(server.serve_forever())
                async with await udskit.aio.connect(path) as client:
                    await client.send(b"patience")
                    assert await client.recv() == b"PATIENCE"
                server.stop()
                await serving
        assert failures == 2
        # Said once as it began (the second try at debug level), once as it ended.
        assert caplog.text.count("accept failed (Too many open files)") == 1
        assert caplog.text.count("accepting again, after 2 failed tries") == 1

    arun(main())


def test_bad_arguments(arun: Run, sockdir: Path, no_fd_leak: None) -> None:
    path = sockdir / "bad.sock"

    async def main() -> None:
        with pytest.raises(TypeError, match="handler must be"):
            await udskit.aio.start_server(path, "not callable")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_clients must be a positive"):
            await udskit.aio.start_server(path, upper, max_clients=0)
        with pytest.raises(ValueError, match="unknown socket type"):
            await udskit.aio.start_server(path, upper, type="carrier-pigeon")
        assert not path.exists(), "nothing is left behind by a refused server"
        async with await udskit.aio.start_server(path, upper):
            with pytest.raises(AddressInUse):
                await udskit.aio.start_server(path, upper)

    arun(main())


SERVE_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    import udskit.aio

    async def upper(channel):
        async for message in channel:
            await channel.send(message.upper())

    udskit.aio.run(udskit.aio.serve(sys.argv[1], upper), use_uvloop=sys.argv[2] == "uvloop")
    print("default SIGTERM again:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_a_signal(
    loop_name: str, sockdir: Path, signum: signal.Signals
) -> None:
    path = sockdir / "served.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(path), loop_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_connectable(path)
        with udskit.connect(path) as client:
            client.send(b"hello")
            assert client.recv() == b"HELLO"
            child.send_signal(signum)
            with pytest.raises(ConnectionClosed):
                client.recv()  # the server shut our connection down
        out, err = child.communicate(timeout=READY_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert err == ""
    assert out == "default SIGTERM again: True\n"
    assert not path.exists()


def test_stop_gives_all_stuck_handlers_one_grace_period(
    arun: Run, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every client's socket is shut down at once and the handlers share one deadline:
    six handlers that ignore their connection cost one grace period, not six."""
    path = sockdir / "stuck.sock"
    grace, stuck = 0.3, 6
    monkeypatch.setattr(udskit.aio.server, "SHUTDOWN_GRACE", grace)

    async def stubborn(channel: udskit.aio.Channel) -> None:
        await asyncio.Event().wait()  # ignores its connection until cancelled

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await udskit.aio.start_server(path, stubborn)
        serving = asyncio.ensure_future(server.serve_forever())
        clients = [await udskit.aio.connect(path) for _ in range(stuck)]
        await turns_until(lambda: server.active_clients == stuck)
        started = loop.time()
        server.stop()
        await serving
        took = loop.time() - started
        for client in clients:
            client.close()
        assert server.active_clients == 0
        assert grace * 0.9 <= took < stuck * grace / 2, f"stop took {took:.2f} s"

    arun(main())
