"""Faults and bad input over asyncio: peers that vanish mid-message or with data unread,
too many descriptors, truncated packets, oversized frames, refused peers. Each error is the
blocking API's, and no descriptor is left open."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed, FrameTooLarge, Policy, ProtocolError, Timeout

from ..conftest import no_descriptor_left, open_fds
from ..integration.children import NOBODY, Talker, needs_root
from .helpers import idle_turns, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def _raw_pair(kind: int = socket.SOCK_STREAM, **options: Any) -> tuple[socket.socket, Any]:
    """A plain socket, and an aio Channel on the other end of a socketpair."""
    raw, ours = socket.socketpair(socket.AF_UNIX, kind)
    return raw, udskit.aio.Channel(ours, **options)


def test_peer_gone_mid_message(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        raw, channel = _raw_pair()
        raw.sendall(struct.pack(">I", 5) + b"whole")
        raw.sendall(struct.pack(">I", 100) + b"only ten..")
        raw.close()
        with pytest.raises(ConnectionClosed, match="mid-message: 14 of 104 bytes") as caught:
            [message async for message in channel]  # iteration does not hide it
        assert caught.value.mid_message
        with pytest.raises(ConnectionClosed, match="mid-message"):
            await channel.recv()  # and it stays that way
        channel.close()

    arun(main())


def test_peer_gone_with_our_data_unread(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair()
        await left.send(b"never read")
        right.close()  # with unread data: the kernel resets the connection
        with pytest.raises(ConnectionClosed, match="closed") as caught:
            await left.recv()
        assert not caught.value.mid_message
        with pytest.raises(ConnectionClosed, match="closed"):
            await left.recv()
        with pytest.raises(ConnectionClosed, match="the peer closed the connection") as sent:
            await left.send(b"anyone?")
        assert isinstance(sent.value, ConnectionError)
        left.close()

    arun(main())


#: Bound on a receive that must end at once: a hang fails the test in seconds, not at the
#: suite's timeout (a bound, not a synchronisation).
STUCK = 5.0


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("waiting", [False, True], ids=["idle", "waiting"])
def test_last_words_of_a_peer_gone_with_our_data_unread(
    arun: Run, kind: str, waiting: bool, no_fd_leak: None
) -> None:
    """The peer sends its last message and closes with ours unread (the kernel resets the
    connection): we get that message, then ConnectionClosed. On uvloop the second recv()
    waited for ever: libuv ends a poll handle on a socket error, after one last callback,
    and that callback had read only the message."""

    async def main() -> None:
        left, right = udskit.aio.pair(kind)
        await left.send(b"never read")
        first = asyncio.ensure_future(left.recv()) if waiting else None
        await idle_turns(5)
        await right.send(b"last words")
        right.close()
        if first is None:
            first = asyncio.ensure_future(left.recv())
        assert await asyncio.wait_for(first, STUCK) == b"last words"
        with pytest.raises(ConnectionClosed, match="closed"):
            await asyncio.wait_for(left.recv(), STUCK)
        left.close()

    arun(main())


def test_peer_gone_while_data_is_queued(arun: Run, no_fd_leak: None) -> None:
    """EPIPE found by the writer callback: the waiting sender and every later one hear it."""

    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=8192)
        big = bytes(512 * 1024)
        sending = asyncio.ensure_future(sender.send(big))
        await turns_until(lambda: sender.write_buffer_size > 0)
        reader.close()
        with pytest.raises(ConnectionClosed, match="the peer closed the connection"):
            await sending
        assert sender.write_buffer_size == 0, "the queue is dropped, not kept forever"
        with pytest.raises(ConnectionClosed):
            await sender.send(b"later")
        sender.close()

    arun(main())


def test_too_many_descriptors_to_send(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair(max_fds=2)
        pipes = [os.pipe() for _ in range(2)]
        fds = [fd for pipe in pipes for fd in pipe]
        try:
            with pytest.raises(ProtocolError, match=r"cannot send 4 descriptors .* limit is 2"):
                await left.send_fds(b"too many", fds)
            with pytest.raises(ValueError, match="non-negative ints"):
                await left.send_fds(b"bad", [-1])
            await left.send(b"still fine")
            assert await right.recv() == b"still fine"
        finally:
            for fd in fds:
                os.close(fd)
        left.close()
        right.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_too_many_descriptors_received(arun: Run, kind: str, no_fd_leak: None) -> None:
    """The sender (blocking, max_fds 16) sends 8; we accept 2: ProtocolError, every one of
    them closed. A packet channel goes on with the next message; a stream cannot (the read's
    bytes went with the descriptors), so every later recv says so."""

    async def main() -> None:
        raw_ours, raw_theirs = socket.socketpair(socket.AF_UNIX, udskit.options.socket_kind(kind))
        theirs = udskit.Channel(raw_theirs)
        ours = udskit.aio.Channel(raw_ours, max_fds=2)
        pipes = [os.pipe() for _ in range(4)]
        fds = [fd for pipe in pipes for fd in pipe]
        try:
            before = open_fds()
            theirs.send_fds(b"eight", fds)
            with pytest.raises(ProtocolError, match="all received descriptors closed"):
                await ours.recv_fds()
            assert open_fds() == before
            theirs.send(b"next")
            if kind == "stream":
                with pytest.raises(ProtocolError, match="nothing more can be received"):
                    await ours.recv()
            else:
                assert await ours.recv() == b"next"
        finally:
            for fd in fds:
                os.close(fd)
            theirs.close()
            ours.close()

    arun(main())


def test_descriptors_over_max_fds_never_build_a_wrong_message(arun: Run, no_fd_leak: None) -> None:
    """300 KiB, then a message with 20 descriptors (we take 2), then 60 KB: every message
    received is one that was sent, and once the stream has a hole, nothing more is."""

    async def main() -> None:
        raw_ours, raw_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs = udskit.Channel(raw_theirs, max_fds=253)
        ours = udskit.aio.Channel(raw_ours, max_fds=2)
        pipes = [os.pipe() for _ in range(10)]
        fds = [fd for pipe in pipes for fd in pipe]
        sent = [b"a" * 300 * 1024, b"b" * 1000, b"c" * 60_000]

        def send_all() -> None:
            theirs.send(sent[0])
            theirs.send_fds(sent[1], fds)
            theirs.send(sent[2])

        try:
            sending = asyncio.get_running_loop().run_in_executor(None, send_all)
            results: list[bytes | str] = []
            for _ in sent:
                try:
                    results.append(await ours.recv())
                except ProtocolError as exc:
                    results.append(str(exc))
            await sending
        finally:
            for fd in fds:
                os.close(fd)
            theirs.close()
            ours.close()
        # The first message may share its last read with the descriptors, and go with them.
        first_error = next(i for i, item in enumerate(results) if isinstance(item, str))
        assert results[:first_error] == sent[:first_error]
        assert all(isinstance(item, str) for item in results[first_error:])
        assert "max_fds" in str(results[first_error])
        assert "nothing more can be received" in str(results[-1])

    arun(main())


def test_text_is_refused_with_a_hint(arun: Run) -> None:
    async def main() -> None:
        for kind in ("stream", "seqpacket", "dgram"):
            left, right = udskit.aio.pair(kind)
            async with left, right:
                for call in (
                    left.send("text"),  # type: ignore[arg-type]
                    left.send_many(["text"]),  # type: ignore[list-item]
                    left.send_fds("text", []),  # type: ignore[arg-type]
                ):
                    with pytest.raises(TypeError, match="messages are bytes, not str"):
                        await call
                await left.send(b"fine")
                assert await right.recv() == b"fine"

    arun(main())


def test_what_is_not_a_message_is_named_as_the_blocking_api_does(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """None, an int, or bytes given to send_many (which iterates it into ints) are refused
    with what a message is; descriptors that are not a sequence, or not open, are named.
    Nothing is sent meanwhile: the next message arrives alone."""

    async def main() -> None:
        closed_r = max(open_fds()) + 1000  # far above anything this test opens
        for kind in ("stream", "seqpacket"):
            left, right = udskit.aio.pair(kind)
            async with left, right:
                for call in (
                    left.send(None),  # type: ignore[arg-type]
                    left.send(5),  # type: ignore[arg-type]
                    left.send_many(b"abc"),  # type: ignore[arg-type]
                    # a stream's batch is checked whole first; packets go one by one
                    left.send_many([b"fine", 7] if kind == "stream" else [7]),  # type: ignore[list-item]
                ):
                    with pytest.raises(
                        TypeError, match=r"messages are bytes-like .*, not (NoneType|int)"
                    ):
                        await call
                with pytest.raises(TypeError, match=r"send_fds: fds is a sequence .* not int"):
                    await left.send_fds(b"x", 5)  # type: ignore[arg-type]
                with pytest.raises(
                    ValueError, match=f"send_fds: descriptor {closed_r} is not open"
                ):
                    await left.send_fds(b"x", [closed_r])
                await left.send(b"alone")
                assert await right.recv() == b"alone"
        async with await udskit.aio.listen(sockdir / "d.sock", type="dgram") as listener:
            with pytest.raises(ValueError, match=f"send_to: descriptor {closed_r} is not open"):
                await listener.send_to(sockdir / "d.sock", b"x", [closed_r])

    arun(main())


def test_too_many_descriptors_to_a_datagram_listener(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    path = sockdir / "dgram.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, type="dgram", max_fds=1) as listener:
            with udskit.connect(path, type="dgram") as client:
                read_end, write_end = os.pipe()
                before = open_fds()
                client.send_fds(b"two", [read_end, write_end])
                client.send(b"none")
                os.close(read_end)
                os.close(write_end)
                with pytest.raises(ProtocolError, match="descriptors"):
                    await listener.recv()
                assert (await listener.recv()).data == b"none"
                assert open_fds() <= before

    arun(main())


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_truncated_packet_is_an_error(arun: Run, kind: str, no_fd_leak: None) -> None:
    async def main() -> None:
        raw, channel = _raw_pair(udskit.options.socket_kind(kind), max_frame=1024)
        read_end, write_end = os.pipe()
        before = open_fds()
        raw.sendmsg(
            [bytes(2000)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", write_end))],
        )
        raw.send(b"small")
        with pytest.raises(ProtocolError, match=r"larger than max_frame \(1024 bytes\)"):
            await channel.recv()
        assert open_fds() == before, "the truncated message's descriptor was closed"
        assert await channel.recv() == b"small"
        os.close(read_end)
        os.close(write_end)
        raw.close()
        channel.close()

    arun(main())


def test_truncated_datagram_to_a_listener(arun: Run, sockdir: Path, no_fd_leak: None) -> None:
    path = sockdir / "dgram.sock"

    async def main() -> None:
        async with (
            await udskit.aio.listen(path, type="dgram", max_frame=1024) as listener,
            await udskit.aio.connect(path, type="dgram") as client,
        ):
            await client.send(bytes(4096))
            await client.send(b"fits")
            with pytest.raises(ProtocolError, match="arrived truncated; raise max_frame"):
                await listener.recv()
            assert (await listener.recv()).data == b"fits"

    arun(main())


def test_frames_over_max_frame(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair(max_frame=1000)
        with pytest.raises(FrameTooLarge, match="over max_frame"):
            await left.send(bytes(1001))
        with pytest.raises(FrameTooLarge, match="over max_frame"):
            await left.send_many([b"fine", bytes(1001)])
        await left.send(b"after")  # nothing of the refused messages went out
        assert await right.recv() == b"after"
        left.close()
        right.close()
        raw, channel = _raw_pair(max_frame=1000)
        raw.sendall(struct.pack(">I", 50_000_000))
        with pytest.raises(FrameTooLarge, match="peer announced a message of 50000000 bytes"):
            await channel.recv()
        raw.close()
        channel.close()

    arun(main())


def test_policy_refuses_a_connection(
    arun: Run, sockdir: Path, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    path = sockdir / "guarded.sock"

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udskit"):
            listener = await udskit.aio.listen(path, allow=Policy(uids={NOBODY}))
            async with listener, await udskit.aio.connect(path) as client:
                listener.settimeout(0.05)
                with pytest.raises(Timeout, match="accept"):
                    await listener.accept()  # ours was refused: nothing else to accept
                with pytest.raises(ConnectionClosed):
                    await client.recv()  # the refused client is told, it does not hang
        assert f"refused peer pid={os.getpid()} uid={os.getuid()}" in caplog.text

    arun(main())


def test_policy_drops_a_datagram_and_its_descriptors(
    arun: Run, sockdir: Path, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    path = sockdir / "guarded.sock"

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udskit"):
            listener = await udskit.aio.listen(path, type="dgram", allow=Policy(uids={NOBODY}))
            async with listener, await udskit.aio.connect(path, type="dgram") as client:
                read_end, write_end = os.pipe()
                before = open_fds()
                await client.send_fds(b"refused", [read_end, write_end])
                os.close(read_end)
                os.close(write_end)
                listener.settimeout(0.05)
                with pytest.raises(Timeout):
                    await listener.recv()
                assert open_fds() <= before
        assert "refused peer" in caplog.text

    arun(main())


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_policy_with_a_real_second_uid(
    arun: Run, sockdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    sockdir.chmod(0o755)
    path = sockdir / "app.sock"

    def as_nobody(say: Callable[[str], None]) -> None:
        with udskit.connect(path, type=kind, timeout=10) as channel:
            say("connected")
            try:
                channel.send(b"let me in")
                say("served: " + channel.recv().decode())
            except ConnectionClosed as exc:
                say(f"refused: {exc}")

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udskit"):
            async with await udskit.aio.listen(
                path, type=kind, mode=0o666, allow=Policy(uids={0})
            ) as listener:
                assert isinstance(listener, udskit.aio.Listener)
                with Talker(as_nobody, as_user=NOBODY) as child:
                    assert child.line() == "connected"
                    # Ours queues behind the child's: accept() refuses the child, returns ours.
                    async with await udskit.aio.connect(path, type=kind) as ours:
                        async with await listener.accept() as server:
                            assert server.peer is not None
                            assert server.peer.uid == 0
                            await server.send(b"welcome")
                        assert await ours.recv() == b"welcome"
                    assert child.line().startswith("refused: ")
        assert f"uid={NOBODY} gid={NOBODY} (allowed: uid 0)" in caplog.text

    arun(main())


def test_send_fds_out_of_descriptors_to_queue_them_says_so_and_sends_nothing(
    arun: Run, no_fd_leak: None
) -> None:
    """A send_fds() the kernel cannot take at once queues the message with duplicates of
    its descriptors; with none left to duplicate into, it fails in udskit's words, naming
    the limit, and nothing of the message goes (the next message arrives whole)."""

    async def main() -> None:
        raw, channel = _raw_pair()
        raw.setblocking(False)
        filler = b"x" * 4096
        try:
            sock = socket.socket(fileno=os.dup(channel.fileno()))
            with sock:
                sock.setblocking(False)
                while True:  # bounded: by the socket's buffers
                    try:
                        sock.send(struct.pack(">I", len(filler)) + filler)
                    except BlockingIOError:
                        break
            r, w = os.pipe()
            try:
                with no_descriptor_left(), pytest.raises(udskit.UdsError) as caught:
                    await channel.send_fds(b"with a pipe", [r])
            finally:
                os.close(r)
                os.close(w)
            text = str(caught.value)
            assert "open-file limit" in text, text
            assert "\n" not in text
            assert not isinstance(caught.value, ConnectionClosed)
            sending = asyncio.ensure_future(channel.send(b"after"))
            received = []
            while len(received) < 2 or received[-1] != b"after":  # bounded: by what was sent
                header = await asyncio.wait_for(_recv_exactly(raw, 4), 5)
                received.append(
                    await asyncio.wait_for(_recv_exactly(raw, *struct.unpack(">I", header)), 5)
                )
                assert len(received) < 10_000, "more messages than were sent"
            await sending
            assert set(received[:-1]) == {filler}
        finally:
            channel.close()
            raw.close()

    arun(main())


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        assert chunk, "end of stream"
        data += chunk
    return data
