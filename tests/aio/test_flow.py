"""Flow: backpressure on a peer that does not read, bounded read-ahead, the batching fast
paths, socket buffer sizes, and what cancelling or closing does to waiting tasks."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed, Timeout
from udskit.aio.buffers import FDS_AHEAD, READ_AHEAD, RECV_CHUNK, WRITE_HIGH_WATER
from udskit.options import DEFAULT_STREAM_BUFFER

from ..conftest import open_fds
from .helpers import first_error, idle_turns, numbered, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]

#: Small kernel buffers make a peer that does not read fill up after a few messages.
SMALL_SNDBUF = 8 * 1024


def test_a_peer_that_does_not_read_stops_the_sender(arun: Run) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF)
        messages = numbered(300, 4096)
        done = 0

        async def send_all() -> None:
            nonlocal done
            for message in messages:
                await sender.send(message)
                done += 1

        task = asyncio.ensure_future(send_all())
        await turns_until(lambda: sender.write_buffer_size > sender.write_limit)
        assert sender.write_limit == WRITE_HIGH_WATER
        stuck_at = done
        await idle_turns()
        # Waiting, not queueing: nothing more was accepted, the queue did not grow past the
        # limit plus the one message that crossed it.
        assert not task.done()
        assert done == stuck_at < len(messages)
        assert sender.write_buffer_size <= sender.write_limit + 4096 + 4
        # The reader drains: the sender resumes and everything arrives, in order.
        received = [await reader.recv() for _ in messages]
        await task
        assert received == messages
        assert sender.write_buffer_size == 0
        sender.close()
        reader.close()

    arun(main())


def test_write_limit_zero_keeps_nothing_queued(arun: Run) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF, write_limit=0)
        assert sender.write_limit == 0
        messages = numbered(100, 4096)
        most = 0

        async def send_all() -> None:
            nonlocal most
            for message in messages:
                await sender.send(message)
                most = max(most, sender.write_buffer_size)

        task = asyncio.ensure_future(send_all())
        received = [await reader.recv() for _ in messages]
        await task
        assert received == messages
        assert most == 0, "each send() returned only once its message was in the kernel"
        sender.close()
        reader.close()

    arun(main())


def test_send_timeout_loses_nothing(arun: Run) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF)
        sender.settimeout(0.02)
        messages = iter(numbered(1000, 4096))
        sent: list[bytes] = []

        async def send_next() -> None:
            sent.append(next(messages))
            await sender.send(sent[-1])

        caught = await first_error(send_next, Timeout)
        assert isinstance(caught, TimeoutError)
        assert "send timed out" in str(caught)
        # The message that timed out stays queued and goes out once the peer reads.
        received = [await reader.recv() for _ in sent]
        assert received == sent
        sender.close()
        reader.close()

    arun(main())


def test_read_ahead_is_bounded(arun: Run) -> None:
    """A consumer that stops calling recv() makes its channel stop reading: the sender
    (here in the same loop) feels it, and the receiving side holds bounded memory."""

    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF, rcvbuf=SMALL_SNDBUF)
        messages = numbered(2000, 8192)  # 16 MiB, far over READ_AHEAD
        task = asyncio.ensure_future(sender.send_many(messages))
        first = await reader.recv()  # starts the reader callback, then takes no more
        await turns_until(lambda: sender.write_buffer_size > sender.write_limit)
        await idle_turns()
        assert not task.done()
        assert reader._ready_bytes <= READ_AHEAD + RECV_CHUNK
        rest = [await reader.recv() for _ in messages[1:]]
        await task
        assert [first, *rest] == messages
        sender.close()
        reader.close()

    arun(main())


def test_read_ahead_of_empty_messages_is_bounded(arun: Run) -> None:
    """Empty messages (a 4-byte header each) to a consumer that stops calling recv(): they
    never add up to READ_AHEAD bytes, so the channel read them on without end, the queue
    growing by a slot per 4 bytes the peer sent, as long as the peer went on."""
    block = b"\0\0\0\0" * 16384  # 16384 empty messages
    limit = 4 * 1024 * 1024  # what the peer offers at most: a million messages

    async def main() -> None:
        raw, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = udskit.aio.Channel(ours)
        raw.sendall(b"\0\0\0\x01x")
        assert await channel.recv() == b"x"  # the consumer takes this one, then no more
        raw.setblocking(False)
        sent = 0
        while sent < limit:
            try:
                sent += raw.send(block)
            except BlockingIOError:  # the kernel's buffer is full: the backpressure
                break
            await idle_turns(2)  # the reader callback runs
        assert sent < limit, "the channel read on and on"
        assert not channel._reading
        assert len(channel._ready) <= 2 * 16 * 1024 + RECV_CHUNK // 4
        # The last send may have ended inside a header: complete it, as the reader drains.
        tail = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(raw, bytes(-sent % 4)))
        received = 0
        while received * 4 < sent:
            received += len(await channel.recv_many())
        await tail
        raw.close()
        assert received * 4 == sent + (-sent % 4)
        channel.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "listener"])
def test_read_ahead_of_descriptors_is_bounded(
    arun: Run, kind: str, sockdir: Path, no_fd_leak: None
) -> None:
    """Tiny messages with 16 descriptors each, to a consumer that stops calling recv():
    reading stops once FDS_AHEAD descriptors wait, the kernel holds the rest. A stream
    channel read on until the process ran out of descriptors (EMFILE), 1 MiB of such
    messages being some 200,000 of them."""
    count, per_message = 120, 16

    async def main() -> None:
        pipe_r, pipe_w = os.pipe()
        rights = [
            (
                socket.SOL_SOCKET,
                socket.SCM_RIGHTS,
                array.array("i", [pipe_r] * per_message).tobytes(),
            )
        ]
        if kind == "listener":
            listener = await udskit.aio.listen(sockdir / "d.sock", type="dgram")
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            raw.connect(str(sockdir / "d.sock"))
            receive: Callable[[], Coroutine[Any, Any, tuple[bytes, Sequence[int]]]]

            async def receive() -> tuple[bytes, Sequence[int]]:
                datagram = await listener.recv()
                return datagram.data, datagram.fds

            closer: Any = listener
        else:
            kind_number = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
            raw, ours = socket.socketpair(socket.AF_UNIX, kind_number)
            channel = udskit.aio.Channel(ours)
            receive = channel.recv_fds
            closer = channel
        frame = b"\0\0\0\x01x" if kind == "stream" else b"x"
        raw.sendmsg([frame])  # the consumer takes this one, then no more
        assert await receive() == (b"x", [] if kind != "listener" else ())
        before = open_fds()
        raw.setblocking(False)
        sent = 0
        for _ in range(count):
            try:
                raw.sendmsg([frame], rights)
            except BlockingIOError:  # the kernel's queue is full: the backpressure
                break
            sent += 1
            await asyncio.sleep(0)  # a loop turn per message: the reader callback runs
        await idle_turns()
        held = len(open_fds() - before)
        assert held <= FDS_AHEAD + per_message, f"{held} descriptors read ahead"
        assert sent * per_message > held, "the test sent too few to show a bound"
        for _ in range(sent):
            data, fds = await receive()
            assert (data, len(fds)) == (b"x", per_message)
            for fd in fds:
                os.close(fd)
        closer.close()
        raw.close()
        os.close(pipe_r)
        os.close(pipe_w)

    arun(main())


class CountingSocket(socket.socket):
    """A real socket that counts the system calls made to send."""

    calls = 0

    def send(self, *args: Any, **kwargs: Any) -> int:
        CountingSocket.calls += 1
        return super().send(*args, **kwargs)

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        CountingSocket.calls += 1
        return super().sendmsg(*args, **kwargs)


def test_send_many_and_recv_many_batch_small_messages(arun: Run) -> None:
    async def main() -> None:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        counted = CountingSocket(fileno=left.detach())
        sender = udskit.aio.Channel(counted)
        receiver = udskit.aio.Channel(right)
        messages = numbered(1000, 64)
        CountingSocket.calls = 0
        await sender.send_many(messages)
        assert CountingSocket.calls == 1, "1000 small messages, one system call"
        batch = await receiver.recv_many()
        assert batch == messages, "every message already received comes at once"
        CountingSocket.calls = 0
        for message in messages[:10]:
            await sender.send(message)
        assert CountingSocket.calls == 10
        assert await receiver.recv_many() == messages[:10]
        sender.close()
        receiver.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_send_many_keeps_order_with_mixed_sizes(arun: Run, kind: str) -> None:
    async def main() -> None:
        sender, receiver = udskit.aio.pair(kind)
        big = 150 * 1024 if kind == "stream" else 60 * 1024
        messages = [b"a", b"", bytes(big), b"b" * 100, bytes(big), *numbered(50, 64)]
        if kind == "seqpacket":
            messages.remove(b"")  # an empty seqpacket message reads as end of connection
        task = asyncio.ensure_future(sender.send_many(messages))
        received: list[bytes] = []
        while len(received) < len(messages):
            received += await receiver.recv_many()
        await task
        assert received == messages
        sender.close()
        receiver.close()

    arun(main())


def test_recv_many_closes_descriptors(arun: Run, no_fd_leak: None) -> None:
    async def main() -> None:
        sender, receiver = udskit.aio.pair()
        read_end, write_end = os.pipe()
        await sender.send_fds(b"with fds", [read_end, write_end])
        await sender.send(b"without")
        os.close(read_end)
        os.close(write_end)
        before = open_fds()
        received: list[bytes] = []
        while len(received) < 2:
            received += await receiver.recv_many()
        assert received == [b"with fds", b"without"]
        assert open_fds() <= before
        sender.close()
        receiver.close()

    arun(main())


def _sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def _kernel_sndbuf(requested: int) -> int:
    """What SO_SNDBUF reads back after asking for ``requested``: Linux doubles the value
    (bookkeeping overhead) and caps it at net.core.wmem_max."""
    with open("/proc/sys/net/core/wmem_max") as f:
        ceiling = int(f.read())
    return 2 * min(requested, ceiling)


def test_socket_buffer_sizes(arun: Run, sockdir: Path) -> None:
    path = sockdir / "buffers.sock"

    async def main() -> None:
        left, right = udskit.aio.pair()
        assert _sndbuf(left.socket) == _kernel_sndbuf(DEFAULT_STREAM_BUFFER)
        left.close()
        right.close()
        left, right = udskit.aio.pair(sndbuf=65536, rcvbuf=65536)
        assert _sndbuf(left.socket) == _sndbuf(right.socket) == _kernel_sndbuf(65536)
        left.close()
        right.close()
        with open("/proc/sys/net/core/wmem_default") as f:
            kernel_default = int(f.read())
        left, right = udskit.aio.pair(sndbuf=0)
        assert _sndbuf(left.socket) == kernel_default
        left.close()
        right.close()
        async with (
            await udskit.aio.listen(path, sndbuf=131072) as listener,
            await udskit.aio.connect(path, sndbuf=65536) as client,
        ):
            assert _sndbuf(client.socket) == _kernel_sndbuf(65536)
            async with await listener.accept() as server:
                assert _sndbuf(server.socket) == _kernel_sndbuf(131072)

    arun(main())


def test_cancelled_recv_loses_nothing(arun: Run) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair()
        waiting = asyncio.ensure_future(right.recv())
        await idle_turns(5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await left.send(b"after the cancel")
        assert await right.recv() == b"after the cancel"
        # Cancelled once a message is queued but before the task ran: still not lost.
        waiting = asyncio.ensure_future(right.recv())
        await idle_turns(5)
        await left.send_many([b"one", b"two"])
        await turns_until(lambda: bool(right._ready))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await right.recv_many() == [b"one", b"two"]
        left.close()
        right.close()

    arun(main())


def test_one_receiver_at_a_time(arun: Run) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair()
        first = asyncio.ensure_future(right.recv())
        await idle_turns(5)
        with pytest.raises(RuntimeError, match="another task is already receiving"):
            await right.recv()
        await left.send(b"for the first")
        assert await first == b"for the first"
        left.close()
        right.close()

    arun(main())


def test_closing_wakes_waiting_tasks(arun: Run) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF)
        receiving = asyncio.ensure_future(reader.recv())
        sending = asyncio.ensure_future(sender.send_many(numbered(200, 4096)))
        await turns_until(lambda: sender.write_buffer_size > sender.write_limit)
        reader.close()
        sender.close()
        for task in (receiving, sending):
            with pytest.raises(ConnectionClosed, match="this channel is closed"):
                await task

    arun(main())


def test_aclose_sends_what_is_queued(arun: Run) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF)
        messages = numbered(12, 4096)  # more than the kernel takes, less than write_limit
        for message in messages:
            await sender.send(message)
        assert sender.write_buffer_size > 0
        closing = asyncio.ensure_future(sender.aclose())
        await idle_turns(5)
        assert not closing.done(), "aclose() waits until the queue has gone out"
        received = [await reader.recv() for _ in messages]
        await closing
        assert sender.closed
        assert received == messages
        with pytest.raises(ConnectionClosed, match="the peer closed"):
            await reader.recv()
        reader.close()

    arun(main())


def test_shutdown_write_half_closes(arun: Run) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair()
        await left.send(b"last words")
        await left.shutdown_write()
        for late in (
            left.send(b"too late"),
            left.send_many([b"too", b"late"]),
            left.send_fds(b"too late", [0]),
        ):
            with pytest.raises(ConnectionClosed, match=r"sending side was shut down \(shutdown_"):
                await late
        assert [message async for message in right] == [b"last words"]
        await right.send(b"still heard")
        assert await left.recv() == b"still heard"
        left.close()
        right.close()

    arun(main())
