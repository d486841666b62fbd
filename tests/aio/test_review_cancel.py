"""Cancellation, timeouts and concurrent use at every await point of the asyncio channel,
listener and servers: a message goes out whole or the channel is broken, nothing is spliced
into the next one, no descriptor leaks or rides with the wrong message."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import Timeout

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
