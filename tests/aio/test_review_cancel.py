"""Cancellation, timeouts and concurrent use at every await point of the asyncio channel,
listener and servers: a message goes out whole or the channel is broken, nothing is spliced
into the next one, no descriptor leaks or rides with the wrong message."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed, Timeout

from ..conftest import READY_TIMEOUT
from .helpers import idle_turns, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]

#: Small kernel buffers: a peer that does not read fills them after a few messages.
SMALL_SNDBUF = 4096


async def _stalled_pair(**options: Any) -> tuple[udskit.aio.Channel, udskit.aio.Channel]:
    """A pair whose first end has data queued that the second end has not read."""
    sender, reader = udskit.aio.pair(sndbuf=SMALL_SNDBUF, rcvbuf=SMALL_SNDBUF, **options)
    for _ in range(100):
        await sender.send(bytes(8192))
        if sender.write_buffer_size:
            return sender, reader
    raise AssertionError("the kernel kept taking data from a peer that does not read")


async def _drain_until_fds(reader: udskit.aio.Channel) -> tuple[bytes, list[int]]:
    for _ in range(1000):
        data, fds = await reader.recv_fds()
        if fds or data != bytes(8192):
            return data, fds
    raise AssertionError("the message with descriptors never came")


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_send_fds_given_up_still_passes_the_callers_file(
    arun: Run, how: str, no_fd_leak: None
) -> None:
    """A send_fds() that times out or is cancelled leaves its message queued; its caller then
    closes its descriptor, and the number is reused for another file. The queued message
    must still carry the file it was given (it carried the new one)."""

    async def main() -> None:
        sender, reader = await _stalled_pair()
        first_r, first_w = os.pipe()
        os.write(first_w, b"the caller's file")
        if how == "timeout":
            sender.settimeout(0.01)
            with pytest.raises(Timeout):
                await sender.send_fds(b"with a file", [first_r])
            sender.settimeout(None)
        else:
            task = asyncio.ensure_future(sender.send_fds(b"with a file", [first_r]))
            await idle_turns(5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        os.close(first_r)
        os.close(first_w)
        other_r, other_w = os.pipe()  # most likely the numbers just closed
        os.write(other_w, b"someone else's")
        try:
            data, fds = await _drain_until_fds(reader)
            assert data == b"with a file"
            assert len(fds) == 1
            assert os.read(fds[0], 100) == b"the caller's file"
            os.close(fds[0])
        finally:
            os.close(other_r)
            os.close(other_w)
        sender.close()
        reader.close()

    arun(main())


def test_descriptors_of_a_dropped_queue_are_closed(arun: Run, no_fd_leak: None) -> None:
    """close() drops queued messages, and the descriptors duplicated for them."""

    async def main() -> None:
        sender, reader = await _stalled_pair()
        r, w = os.pipe()
        task = asyncio.ensure_future(sender.send_fds(b"never sent", [r, w]))
        await idle_turns(5)
        os.close(r)
        os.close(w)
        sender.close()
        with pytest.raises(udskit.ConnectionClosed):
            await task
        reader.close()

    arun(main())


#: How long a cancelled task may take to end before the test calls it stuck: a bound, not a
#: synchronisation (a correct channel ends it within a few loop turns).
STUCK = 5.0


def test_cancelling_a_send_inside_async_with_ends_the_task(arun: Run, no_fd_leak: None) -> None:
    """asyncio.timeout() (or any cancel) around ``async with channel`` while send() waits
    for a peer that does not read: leaving the block must close the channel at once. It
    waited, without end, for the queue that cannot drain, so the cancel never took effect."""

    async def main() -> None:
        sender, reader = await _stalled_pair()

        async def client() -> None:
            async with sender:
                await sender.send(bytes(1024 * 1024))  # more than write_limit: waits

        task = asyncio.ensure_future(client())
        await turns_until(lambda: sender.write_buffer_size > sender.write_limit)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STUCK)
        assert done, "the cancelled task is stuck in the channel's __aexit__"
        assert task.cancelled()
        assert sender.closed
        reader.close()

    arun(main())


#: A child that sends one whole message, then half of another with two descriptors, then
#: dies by SIGKILL: no close() of its own, the kernel ends the connection.
_DIES_MID_MESSAGE = r"""
import array, os, signal, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.sendall(struct.pack(">I", 5) + b"whole")
r, w = os.pipe()
rights = array.array("i", [r, w]).tobytes()
sock.sendmsg([struct.pack(">I", 100) + b"half"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
os.kill(os.getpid(), signal.SIGKILL)
"""

#: A child that holds its end open and never reads, until it is killed.
_NEVER_READS = r"""
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


def _child(code: str, sock: socket.socket, **popen: Any) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(sock.fileno())],
            pass_fds=[sock.fileno()],
            text=True,
            **popen,
        )
    finally:
        sock.close()  # the child's now


def test_a_peer_killed_mid_message(arun: Run, no_fd_leak: None) -> None:
    """The whole message arrives; the half one is an error saying so (never a message),
    and the descriptors that came with it are closed."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = udskit.aio.Channel(ours)
        child = _child(_DIES_MID_MESSAGE, theirs)
        try:
            assert await channel.recv() == b"whole"
            with pytest.raises(ConnectionClosed, match="mid-message: 8 of 104") as caught:
                await channel.recv()
            assert caught.value.mid_message
            with pytest.raises(ConnectionClosed, match="mid-message"):
                await channel.recv()  # and so it stays
        finally:
            channel.close()
            assert child.wait(READY_TIMEOUT) == -signal.SIGKILL

    arun(main())


def test_a_peer_killed_while_we_wait_to_send(arun: Run, no_fd_leak: None) -> None:
    """A sender held by backpressure, with a message with descriptors queued behind: the
    peer's death fails the waiting send, drops the queue and closes the duplicates."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = udskit.aio.Channel(ours)
        child = _child(_NEVER_READS, theirs, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdout is not None
        assert child.stdin is not None
        try:
            assert child.stdout.readline() == "ready\n"
            r, w = os.pipe()
            sending = asyncio.ensure_future(channel.send(bytes(8 * 1024 * 1024)))
            await turns_until(lambda: channel.write_buffer_size > channel.write_limit)
            with_fds = asyncio.ensure_future(channel.send_fds(b"with files", [r, w]))
            await idle_turns(5)
            os.close(r)
            os.close(w)
            child.kill()
            for task in (sending, with_fds):
                with pytest.raises(ConnectionClosed):
                    await task
            assert channel.write_buffer_size == 0
            with pytest.raises(ConnectionClosed):
                await channel.send(b"later")
        finally:
            channel.close()
            child.stdin.close()
            child.stdout.close()
            child.wait(READY_TIMEOUT)

    arun(main())


def test_a_cancelled_send_never_splices_the_next(arun: Run) -> None:
    """send(), send_many() and send_fds() cancelled while they wait: each message they had
    accepted arrives whole, in order, before the ones sent after them."""

    async def main() -> None:
        sender, reader = await _stalled_pair()
        big = bytes(range(256)) * 4096  # 1 MiB, over write_limit: send() waits
        r, w = os.pipe()
        for call in (
            sender.send(big),
            sender.send_many([b"many-1", big, b"many-2"]),
            sender.send_fds(b"with files", [r, w]),
        ):
            task = asyncio.ensure_future(call)
            await idle_turns(5)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        os.close(r)
        os.close(w)
        after = asyncio.ensure_future(sender.send(b"after"))  # waits: the queue is full
        received = []
        while not received or received[-1] != b"after":
            data, fds = await reader.recv_fds()
            for fd in fds:
                os.close(fd)
            if data != bytes(8192):  # what filled the socket before
                received.append(data)
        await after
        assert received == [big, b"many-1", big, b"many-2", b"with files", b"after"]
        sender.close()
        reader.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_send_fds_takes_an_iterator_of_descriptors(arun: Run, kind: str, no_fd_leak: None) -> None:
    """The descriptors are read once: given as a generator, all of them go with the message
    (reading them a second time found it empty, and the message went without them)."""

    async def main() -> None:
        left, right = udskit.aio.pair(kind)
        r, w = os.pipe()
        await left.send_fds(b"two files", (fd for fd in (r, w)))
        data, fds = await right.recv_fds()
        assert (data, len(fds)) == (b"two files", 2)
        for fd in (*fds, r, w):
            os.close(fd)
        left.close()
        right.close()

    arun(main())
