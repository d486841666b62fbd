"""``udskit.aio.listen``, ``connect`` and ``pair``: the blocking API's semantics on an event
loop (safe claim, errors, addresses of every kind, options), each on both loops."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import (
    AddressError,
    AddressInUse,
    ConnectError,
    ConnectionClosed,
    PeerCred,
    PeerRejected,
    ProtocolError,
    SocketFileError,
)

from ..conftest import unread
from ..integration.children import NOBODY, fork, reap
from .helpers import idle_turns, turns_until
from .transport import LoopThread

Run = Callable[[Coroutine[Any, Any, Any]], Any]
ME = PeerCred(os.getpid(), os.getuid(), os.getgid())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_listen_claims_and_releases_the_socket_file(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "app.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, type=kind) as listener:
            info = path.stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600, "the default mode is in place at once"
            assert listener.address == udskit.Address.parse(path)
            assert listener.type == kind
            async with await udskit.aio.connect(path, type=kind) as client:
                await client.send(b"ping")
                if isinstance(listener, udskit.aio.DatagramListener):
                    datagram = await listener.recv()
                    assert (datagram.data, datagram.peer, datagram.fds) == (b"ping", ME, ())
                    assert datagram.sender is not None
                    await listener.send_to(datagram.sender, b"pong")
                else:
                    async with await listener.accept() as server:
                        assert server.peer == ME
                        assert await server.recv() == b"ping"
                        await server.send(b"pong")
                assert await client.recv() == b"pong"
                assert client.peer == ME
        assert not path.exists(), "closing the listener removes its socket file"

    arun(main())


def test_live_server_is_never_unlinked(arun: Run, sockdir: Path) -> None:
    path = sockdir / "live.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path) as first:
            inode = path.stat().st_ino
            with pytest.raises(AddressInUse, match="live server") as caught:
                await udskit.aio.listen(path)
            assert caught.value.pid == os.getpid()
            assert isinstance(caught.value, OSError)
            assert path.stat().st_ino == inode
            async with await udskit.aio.connect(path) as client:
                await client.send(b"still served")
                # The refused listen() probed the live server: its probe comes first.
                async with await first.accept() as probe:
                    with pytest.raises(ConnectionClosed):
                        await probe.recv()
                async with await first.accept() as server:
                    assert await server.recv() == b"still served"

    arun(main())


def test_what_is_not_a_socket_is_never_touched(arun: Run, sockdir: Path) -> None:
    path = sockdir / "notes.txt"
    path.write_text("precious")

    async def main() -> None:
        with pytest.raises(SocketFileError, match="never deletes what is not a socket"):
            await udskit.aio.listen(path)

    arun(main())
    assert path.read_text() == "precious"


def test_stale_socket_is_reclaimed(arun: Run, sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))  # closed without unlink: what a killed server leaves

    async def main() -> None:
        async with (
            await udskit.aio.listen(path) as listener,
            await udskit.aio.connect(path) as client,
        ):
            await client.send(b"hello")
            async with await listener.accept() as server:
                assert await server.recv() == b"hello"

    arun(main())
    assert not path.exists()


def test_connect_says_why_it_failed(arun: Run, sockdir: Path) -> None:
    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(stale))
    seqpacket = sockdir / "seq.sock"

    async def main() -> None:
        with pytest.raises(ConnectError, match="no such file; is the server running") as caught:
            await udskit.aio.connect(sockdir / "missing.sock")
        assert isinstance(caught.value, ConnectionError)
        with pytest.raises(ConnectError, match=r"directory .* does not exist"):
            await udskit.aio.connect(sockdir / "nodir" / "x.sock")
        with pytest.raises(ConnectError, match="nothing is listening"):
            await udskit.aio.connect(stale)
        async with await udskit.aio.listen(seqpacket, type="seqpacket"):
            with pytest.raises(ConnectError, match="socket of another type"):
                await udskit.aio.connect(seqpacket, type="stream")

    arun(main())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "raw"}, "unknown socket type"),
        ({"framing": "xml"}, "unknown framing"),
        ({"max_fds": 300}, "max_fds must be from 0 to 253"),
        ({"max_frame": 0}, "max_frame must be a positive"),
        ({"sndbuf": -1}, "sndbuf must be a byte count"),
        ({"rcvbuf": "big"}, "rcvbuf must be a byte count"),
        ({"write_limit": -5}, "write_limit must be a byte count"),
    ],
)
def test_bad_options_fail_before_anything_is_created(
    arun: Run, sockdir: Path, no_fd_leak: None, options: dict[str, Any], message: str
) -> None:
    path = sockdir / "never.sock"

    async def main() -> None:
        with pytest.raises(ValueError, match=message):
            await udskit.aio.listen(path, **options)
        with pytest.raises(ValueError, match=message):
            await udskit.aio.connect(path, **options)
        with pytest.raises(ValueError, match=message):
            udskit.aio.pair(**options)

    arun(main())
    assert list(sockdir.iterdir()) == []


def test_bad_values_for_connect_only_options(arun: Run, sockdir: Path, no_fd_leak: None) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="timeout must be"):
            await udskit.aio.connect(sockdir / "x.sock", timeout=-1)
        with pytest.raises(ValueError, match="expect_uid must be a uid"):
            await udskit.aio.connect(sockdir / "x.sock", expect_uid=-3)
        with pytest.raises(ValueError, match="bind= takes a Unix path"):
            await udskit.aio.connect(sockdir / "x.sock", bind="tcp:127.0.0.1:1")
        with pytest.raises(AddressError, match="empty address"):
            await udskit.aio.connect("")
        with pytest.raises(AddressError, match="unknown address scheme"):
            await udskit.aio.listen("http://example")

    arun(main())


def test_paths_longer_than_sun_path(arun: Run, sockdir: Path) -> None:
    deep = sockdir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "long.sock"
    assert len(os.fsencode(path)) > 108

    async def main() -> None:
        async with (
            await udskit.aio.listen(path) as listener,
            await udskit.aio.connect(path) as client,
        ):
            await client.send(b"far away")
            async with await listener.accept() as server:
                assert await server.recv() == b"far away"
        assert not path.exists()

    arun(main())


def test_abstract_name_warns_without_a_policy(arun: Run, caplog: pytest.LogCaptureFixture) -> None:
    name = f"@udskit-aio-test-{os.getpid()}-{secrets.token_hex(4)}"

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udskit"):
            listener = await udskit.aio.listen(name)
        async with listener:
            assert "abstract names have no file permissions" in caplog.text
            async with await udskit.aio.connect(name) as client:
                await client.send(b"in the namespace")
                async with await listener.accept() as server:
                    assert await server.recv() == b"in the namespace"
            with pytest.raises(AddressInUse, match="abstract name is taken"):
                await udskit.aio.listen(name)

    arun(main())


def test_inherited_descriptors(arun: Run, sockdir: Path, no_fd_leak: None) -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        inherited = theirs.detach()  # a bare descriptor, as a child process inherits it
        with ours:
            async with await udskit.aio.connect(f"fd:{inherited}") as channel:
                assert channel.peer == ME
                ours.sendall(struct.pack(">I", 5) + b"hello")
                assert await channel.recv() == b"hello"
        not_a_socket = os.open(os.devnull, os.O_RDONLY)
        try:
            with pytest.raises(SocketFileError, match="not an open socket"):
                await udskit.aio.connect(f"fd:{not_a_socket}")
        finally:
            os.close(not_a_socket)
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(str(sockdir / "activated.sock"))
        listening.listen()
        async with (
            await udskit.aio.listen(f"fd:{listening.detach()}") as listener,
            await udskit.aio.connect(sockdir / "activated.sock") as client,
        ):
            await client.send(b"socket activation")
            async with await listener.accept() as server:
                assert await server.recv() == b"socket activation"
        os.unlink(sockdir / "activated.sock")

    arun(main())


def test_tcp_for_bridging(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        async with await udskit.aio.listen("tcp:127.0.0.1:0") as listener:
            port = listener.socket.getsockname()[1]
            assert listener.address.port == port  # the port the kernel chose
            async with await udskit.aio.connect(listener.address) as client:
                assert client.peer is None
                await client.send(b"over tcp")
                async with await listener.accept() as server:
                    assert server.peer is None
                    assert await server.recv() == b"over tcp"
                    await server.send_many([b"one", b"two"])
                    assert await client.recv() == b"one"
                    assert await client.recv() == b"two"
                with pytest.raises(ProtocolError, match="only be passed over Unix sockets"):
                    await client.send_fds(b"x", [0])
        with pytest.raises(ConnectError, match=f"cannot connect to tcp:127.0.0.1:{port}"):
            await udskit.aio.connect(f"tcp:127.0.0.1:{port}")

    arun(main())


def test_expect_uid(arun: Run, sockdir: Path) -> None:
    path = sockdir / "app.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path):
            async with await udskit.aio.connect(path, expect_uid=os.getuid()) as client:
                assert client.peer == ME
            with pytest.raises(PeerRejected, match=f"not the expected uid {NOBODY}"):
                await udskit.aio.connect(path, expect_uid=NOBODY)

    arun(main())


def test_client_binds_its_own_path(arun: Run, sockdir: Path) -> None:
    path, mine = sockdir / "server.sock", sockdir / "client.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path) as listener:
            async with await udskit.aio.connect(path, bind=mine) as client:
                assert stat.S_ISSOCK(mine.stat().st_mode)
                async with await listener.accept() as server:
                    assert server.address == udskit.Address.parse(mine)
                    await client.send(b"from a named client")
                    assert await server.recv() == b"from a named client"
            assert not mine.exists(), "the client's own path goes when it closes"

    arun(main())


def test_datagram_client_reply_path_is_private_and_removed(arun: Run, sockdir: Path) -> None:
    path = sockdir / "dgram.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, type="dgram") as listener:
            client = await udskit.aio.connect(path, type="dgram")
            own = Path(client.socket.getsockname())
            assert stat.S_IMODE(own.parent.stat().st_mode) == 0o700
            await client.send(b"answer me")
            datagram = await listener.recv()
            assert datagram.sender == udskit.Address.parse(own)
            await client.aclose()
            assert not own.parent.exists()
            with pytest.raises(ConnectionClosed, match="nothing is bound there any more"):
                await listener.send_to(datagram.sender, b"too late")

    arun(main())


def test_a_datagrams_descriptors_pass_to_one_session_only(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """As udskit.DatagramListener.session(): a second session of a datagram that carries
    descriptors is refused, and so is a datagram whose descriptors the caller closed."""
    path = sockdir / "dgram.sock"
    read_end, write_end = os.pipe()

    async def main() -> None:
        async with (
            await udskit.aio.listen(path, type="dgram") as listener,
            await udskit.aio.connect(path, type="dgram") as client,
        ):
            await client.send_fds(b"with fds", [read_end])
            datagram = await listener.recv()
            async with listener.session(datagram) as first:
                with pytest.raises(
                    RuntimeError, match=r"^session\(datagram\): the datagram's descriptors "
                ):
                    listener.session(datagram)
                data, fds = await first.recv_fds()
                assert data == b"with fds"
                os.close(fds[0])
            await client.send_fds(b"closed early", [read_end])
            closed = await listener.recv()
            (fd,) = closed.fds
            os.close(fd)
            with pytest.raises(ValueError, match=rf"^session\(datagram\): descriptor {fd} "):
                listener.session(closed)

    try:
        arun(main())
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_datagram_listener_that_stops_receiving_keeps_what_it_read_and_replies(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """stop_receiving() (a listener handed over): the datagrams read ahead are still
    returned, replies still go out, and what arrives after stays in the socket's queue."""
    path = sockdir / "dgram.sock"

    async def main() -> None:
        async with (
            await udskit.aio.listen(path, type="dgram") as listener,
            await udskit.aio.connect(path, type="dgram") as client,
        ):
            for message in (b"1", b"2", b"3"):
                await client.send(message)
            first = await listener.recv()
            await turns_until(lambda: unread(listener.socket) == 0)  # 2 and 3 read ahead
            listener.stop_receiving()
            await client.send(b"late")
            await idle_turns()
            assert unread(listener.socket) == len(b"late")  # not taken
            assert [(await listener.recv()).data for _ in range(2)] == [b"2", b"3"]
            with pytest.raises(ConnectionClosed, match="takes no more datagrams"):
                await listener.recv()
            assert [datagram async for datagram in listener] == []
            assert not listener.closed
            await listener.send_to(first.sender, b"reply")  # the socket is open
            assert await client.recv() == b"reply"
            assert unread(listener.socket) == len(b"late")

    arun(main())


def test_connect_waits_while_the_backlog_is_full(arun: Run, sockdir: Path) -> None:
    path = sockdir / "busy.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, backlog=1) as listener:
            queued: list[udskit.aio.Channel] = []
            try:
                # Fill the backlog: a non-blocking Unix connect fails with EAGAIN when full.
                # Linux queues backlog + 1 connections.
                queued.append(await udskit.aio.connect(path, timeout=0.05))
                queued.append(await udskit.aio.connect(path, timeout=0.05))
                with pytest.raises(udskit.Timeout, match=r"connect .* timed out") as caught:
                    await udskit.aio.connect(path, timeout=0.05)
                assert isinstance(caught.value, TimeoutError)
                waiting = asyncio.ensure_future(udskit.aio.connect(path))
                await asyncio.sleep(0)
                assert not waiting.done()
                accepted = await listener.accept()  # frees a slot: the waiting connect gets in
                queued.append(await waiting)
                accepted.close()
            finally:
                for channel in queued:
                    channel.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_pair_works_across_fork(loop_name: str, kind: str) -> None:
    """The pair is made before any loop exists; each process runs its own loop."""
    parent_end, child_end = udskit.aio.pair(kind)

    def child() -> int:
        parent_end.close()

        async def answer() -> None:
            message = await child_end.recv()
            await child_end.send(message.upper())
            child_end.close()

        udskit.aio.run(answer(), use_uvloop=loop_name == "uvloop")
        return 0

    pid = fork(child)
    child_end.close()

    async def ask() -> bytes:
        async with parent_end:
            await parent_end.send(b"across fork")
            return await parent_end.recv()

    try:
        reply = udskit.aio.run(asyncio.wait_for(ask(), 20), use_uvloop=loop_name == "uvloop")
    finally:
        code = reap(pid)
    assert (reply, code) == (b"ACROSS FORK", 0)


def test_a_channel_outlives_its_loop(loop_name: str) -> None:
    """Used in one asyncio.run() and then another: the new loop takes the channel over."""
    left, right = udskit.aio.pair()
    use_uvloop = loop_name == "uvloop"
    try:

        async def first() -> None:
            left.settimeout(0.01)
            with pytest.raises(udskit.Timeout):
                await left.recv()  # the reader is now registered with this loop
            left.settimeout(None)

        udskit.aio.run(first(), use_uvloop=use_uvloop)

        async def second() -> bytes:
            await right.send(b"on the next loop")
            return await left.recv()

        assert udskit.aio.run(second(), use_uvloop=use_uvloop) == b"on the next loop"
    finally:
        left.close()
        right.close()


def test_a_channel_in_use_refuses_another_running_loop(loop_name: str) -> None:
    left, right = udskit.aio.pair()
    elsewhere = LoopThread(loop_name)
    try:
        waiting = asyncio.run_coroutine_threadsafe(left.recv(), elsewhere.loop)
        elsewhere.call(lambda: None)  # runs after the recv() task's first step: it waits now

        async def meddle() -> None:
            with pytest.raises(RuntimeError, match="in use by another event loop"):
                await left.recv()

        udskit.aio.run(meddle(), use_uvloop=loop_name == "uvloop")
        elsewhere.run(right.send(b"for the first loop"))
        assert waiting.result(10) == b"for the first loop"
    finally:
        elsewhere.call(left.close)
        right.close()
        elsewhere.stop()
