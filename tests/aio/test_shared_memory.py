"""``udskit.aio`` with ``shared_memory=True``: the same records and pools as the blocking
layer (tests/integration/test_shared_memory.py has the protocol's faults in full), driven
from the event loop; and both layers talking to each other."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
import udskit.shm
from udskit import ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.aio.sending import Sending
from udskit.proto.outbox import Outbox
from udskit.proto.shm import CONTROL_BIT, PAGE, RELEASE, SHARED_THRESHOLD, SLOT, encode_record

from ..conftest import open_fds
from ..integration.test_shared_memory import (
    _attach,
    _attach_unmappable,
    _memfd,
    collect_inside,
    data,
    no_huge_pages,
    pool_mappings,
)
from .helpers import idle_turns, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    """Fail the test if it leaves a descriptor or a pool mapping behind."""
    fds, maps = open_fds(), pool_mappings("")  # every memfd: forged pools too
    yield
    leaked = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
    assert pool_mappings("") == maps, "a shared-memory mapping was left behind"


def test_pair_moves_large_messages_through_the_pool(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            assert a.shared_memory
            message = data(MIB, 1)
            await a.send(b"small")
            await a.send(message)
            assert a.pool_in_use == MIB
            assert await b.recv() == b"small"
            view = await b.recv_view()
            assert view.readonly
            assert view == message
            view.release()  # on the loop's thread: the release goes out at once
            await b.send(b"sync")
            assert await a.recv() == b"sync"
            assert a.pool_in_use == 0
            await a.send(message)
            assert await b.recv() == message  # copied out, released
            loan = await a.loan(2 * MIB)
            loan[:4] = b"loan"
            await a.send(loan)
            with pytest.raises(ValueError, match="released"):
                loan[0] = 1
            got = await b.recv_many()
            assert len(got) == 1
            assert got[0][:4] == b"loan"

    arun(main())


def test_a_close_between_a_receive_and_its_view_names_the_channel(
    arun: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the blocking layer: a channel closed after recv_view() took a message in the
    peer's pool and before its view is made (a fault injected here) fails naming itself."""
    view = udskit.shm.SharedMemory.view

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:

            def closed_first(shm: udskit.shm.SharedMemory, lease: udskit.shm.Lease) -> memoryview:
                b.close()  # the fault: close() lands here
                return view(shm, lease)

            await a.send(data(MIB, 2))
            monkeypatch.setattr(udskit.shm.SharedMemory, "view", closed_first)
            with pytest.raises(
                ConnectionClosed, match=r"^stream channel: the channel was closed, and its "
            ):
                await b.recv_view()

    arun(main())


def test_send_many_on_a_stream_takes_loans_and_large_messages_through_the_pool(
    arun: Run,
) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=2 * MIB)  # two messages: see the blocking test
        async with a, b:
            a.settimeout(20)
            for seed in range(3):
                loan = await a.loan(MIB)
                loan[:] = data(MIB, seed)
                await a.send_many([b"small", loan, data(MIB, seed + 1), b"last"])
                assert a.pool_in_use == 2 * MIB  # both went through the pool
                with pytest.raises(ValueError, match="released"):
                    len(loan)  # handed over, as by send()
                assert await b.recv() == b"small"
                with await b.recv_view() as view:
                    assert view == data(MIB, seed)
                assert await b.recv() == data(MIB, seed + 1)
                assert await b.recv() == b"last"

    arun(main())


def test_a_loan_sent_twice_or_a_strided_buffer_is_refused_in_the_words_of_the_api(
    arun: Run,
) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            loan = await a.loan(MIB)
            loan[:] = data(MIB)
            await a.send(loan)
            for send in (a.send, lambda m: a.send_many([m])):
                with pytest.raises(ValueError, match=r"^send\S*: this memoryview was released"):
                    await send(loan)  # the first send released it
                with pytest.raises(TypeError, match=r"^send\S*: a message is one contiguous"):
                    await send(memoryview(bytes(2 * SHARED_THRESHOLD))[::2])
            await a.send(b"after")  # nothing went, and the channel is whole
            assert await b.recv() == data(MIB)
            assert await b.recv() == b"after"

    arun(main())


def test_a_full_pool_says_who_holds_it_and_which_call_timed_out(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=2 * MIB)
        async with a, b:
            a.settimeout(0)
            await a.send(data(MIB))
            loan = await a.loan(MIB)  # the pool is full: half at the receiver, half with us
            with pytest.raises(Timeout, match=rf"holds {MIB} bytes unreleased, and {MIB} b"):
                await a.loan(MIB)
            with pytest.raises(Timeout, match=r"in loans of ours not sent yet\); send timed out"):
                await a.send(data(MIB))
            loan.release()
            assert await b.recv() == data(MIB)

    arun(main())


def test_a_receiver_that_holds_its_views_stops_the_sender(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=2 * MIB)
        async with a, b:
            await a.send(data(MIB))
            await a.send(data(MIB))
            held = [await b.recv_view(), await b.recv_view()]
            a.settimeout(0.05)
            with pytest.raises(Timeout, match="pool stayed full"):
                await a.send(data(MIB))
            a.settimeout(None)
            sending = asyncio.ensure_future(a.send(data(MIB, 7)))
            await asyncio.sleep(0)
            assert not sending.done()
            held.pop().release()  # the release reaches a's reader: the send completes
            await sending
            assert await b.recv() == data(MIB, 7)
            held.pop().release()

    arun(main())


def test_a_loan_given_up_wakes_a_sender_waiting_for_room(arun: Run) -> None:
    """Room freed here, by a loan of ours given up, not by a release from the peer: the
    sender waiting for it sees it (within POOL_WAIT), with nothing arriving to wake it."""

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=256 * 1024)  # room for one message
        async with a, b:
            a.settimeout(20.0)
            loan = await a.loan(256 * 1024)
            sending = asyncio.ensure_future(a.send(data(256 * 1024, 4)))
            await idle_turns()
            assert not sending.done()  # it waits for room
            loan.release()
            await sending
            assert await b.recv() == data(256 * 1024, 4)

    arun(main())


def test_a_view_ended_inside_the_lock_is_released_all_the_same(
    arun: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A view whose end a garbage collection sees while the loop's thread holds the
    shared-memory lock (taking in the peer's release, in the reader callback): its release
    still goes out, and the peer waiting for room gets it while recv() waits."""
    small = 256 * 1024  # room for one message each way

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=small)
        async with a, b:
            b.settimeout(20.0)
            await b.send(data(small, 1))
            view = await a.recv_view()
            cycle: list[object] = [view]  # the view ends only in a collection
            cycle.append(cycle)
            del view, cycle
            await a.send(data(small, 2))
            assert await b.recv() == data(small, 2)  # its release is on its way to a
            collect_inside(monkeypatch, lambda: a._shm.pool)  # type: ignore[union-attr]
            receiving = asyncio.ensure_future(a.recv())
            await b.send(data(small, 3))  # needs the room that view held
            assert await receiving == data(small, 3)

    gc.disable()
    try:
        arun(main())
    finally:
        gc.enable()


@pytest.mark.parametrize("where", ["cut", "small", "queued"])
def test_a_view_ended_by_a_collection_in_a_write_splices_nothing(
    arun: Run, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A collection may start at any allocation, and end a view whose release must not
    go out inside a message being written: after the socket took part of it and before
    the rest is queued (``cut``: a large message, ``small``: the inline path of one), or
    between its parts as they are queued behind others (``queued``)."""
    size = {"cut": SHARED_THRESHOLD - PAGE, "small": 60 * 1024, "queued": 200 * 1024}[where]
    seen: list[str] = []

    def queue(self: Sending, views: list[memoryview], ancillary: object) -> None:
        if not self._out:
            seen.append("empty")
            gc.collect()
        original_queue(self, views, ancillary)  # type: ignore[arg-type]

    def push(self: Outbox[object], buffers: list[memoryview], attachment: object = None) -> None:
        if self and len(buffers) > 1:
            seen.append("between")
            original_push(self, buffers[:1], attachment)
            gc.collect()
            original_push(self, buffers[1:])
        else:
            original_push(self, buffers, attachment)

    original_queue, original_push = Sending._queue, Outbox.push

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            b.settimeout(10.0)
            b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            await a.send(data(MIB))
            view = await b.recv_view()
            cycle: list[object] = [view]  # the view ends only in a collection
            cycle.append(cycle)
            del view, cycle
            messages = [data(size, 3), data(size, 4)]

            async def receive_two() -> list[bytes]:
                return [await a.recv(), await a.recv()]

            if where == "queued":
                monkeypatch.setattr(Outbox, "push", push)
                # Both start before the loop looks at the sockets: the first one's end is
                # queued, the second one goes behind it, in parts.
                sends = [asyncio.ensure_future(b.send(message)) for message in messages]
                await asyncio.sleep(0)
                received = await receive_two()
                await asyncio.gather(*sends)
            else:
                monkeypatch.setattr(Sending, "_queue", queue)
                receiving = asyncio.ensure_future(receive_two())
                for message in messages:
                    await b.send(message)
                received = await receiving
            monkeypatch.undo()
            assert seen[0] == ("between" if where == "queued" else "empty")
            assert received == messages
            await b.send(b"sync")  # behind the release
            assert await a.recv() == b"sync"
            assert a.pool_in_use == 0

    gc.disable()
    try:
        arun(main())
    finally:
        gc.enable()


def test_a_release_from_another_thread(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            await a.send(data(MIB))
            view = await b.recv_view()
            thread = threading.Thread(target=view.release)
            thread.start()
            thread.join()
            # The release was handed to b's loop (call_soon_threadsafe): it goes out there.
            await turns_until(lambda: not b._shm.pending)  # type: ignore[union-attr]
            await b.send(b"sync")
            assert await a.recv() == b"sync"
            assert a.pool_in_use == 0

    arun(main())


def test_a_release_from_another_thread_as_the_loop_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop closes between the releasing thread's look at it and its hand-over: the
    release has nowhere to go, and must not raise in that thread (or in a collection)."""

    def closed(*_: object) -> None:
        raise RuntimeError("Event loop is closed")

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            await a.send(data(MIB))
            view = await b.recv_view()
            monkeypatch.setattr(asyncio.get_running_loop(), "call_soon_threadsafe", closed)
            thread = threading.Thread(target=view.release)
            thread.start()
            thread.join()

    asyncio.run(main())  # and pytest fails a test whose thread raised


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([(SLOT, 0, 100)], "before its pool"),
        ([("attach",), (SLOT, PAGE * 64, 100)], "outside its pool"),
        ([(RELEASE, 0, 0)], "never sent"),
        ([("unsealed",)], "not sealed"),
        pytest.param([("unmappable",)], "cannot be mapped", marks=no_huge_pages),
    ],
)
def test_forged_records_close_the_channel(
    arun: Run, records: list[tuple[object, ...]], match: str
) -> None:
    async def main() -> None:
        victim, forger = udskit.aio.pair(shared_memory=True)
        async with victim:
            raw = forger.socket
            raw.setblocking(True)
            for record in records:
                if record == ("attach",):
                    _attach(raw, _memfd(PAGE * 64), PAGE * 64)
                elif record == ("unsealed",):
                    _attach(raw, _memfd(PAGE * 64, seals=0), PAGE * 64)
                elif record == ("unmappable",):
                    _attach_unmappable(raw)
                else:
                    raw.sendall(encode_record(*record))  # type: ignore[arg-type]
            with pytest.raises(ProtocolError, match=match):
                await victim.recv()
            with pytest.raises(ProtocolError, match="cannot be used"):
                await victim.recv()
            with pytest.raises(ConnectionClosed):
                await victim.send(b"x")
            with pytest.raises(ConnectionClosed, match="protocol error"):
                await victim.loan(MIB)
        forger.close()

    arun(main())


def test_a_record_over_the_limit_closes_the_channel(arun: Run) -> None:
    async def main() -> None:
        victim, forger = udskit.aio.pair(shared_memory=True)
        async with victim:
            forger.socket.setblocking(True)
            forger.socket.sendall((CONTROL_BIT | 300).to_bytes(4, "big") + bytes(300))
            with pytest.raises(ProtocolError, match=r"record of 0 bytes, or over the limit"):
                await victim.recv()
            with pytest.raises(ConnectionClosed, match="protocol error"):
                await victim.send(b"x")
        forger.close()

    arun(main())


@pytest.mark.parametrize("call", ["recv", "recv_view", "recv_many"])
def test_messages_in_the_pool_queued_before_a_bad_record_give_way_to_its_error(
    arun: Run, call: str
) -> None:
    """The reader takes in everything that arrived: two slots, then a bad record, which
    closes the pools. The slots' messages went with them: the receiver meets the
    protocol error, not a closed pool; a message that came through the socket first is
    still received."""

    async def main() -> None:
        maps = pool_mappings("")
        victim, forger = udskit.aio.pair(shared_memory=True)
        async with victim:
            raw = forger.socket
            raw.setblocking(True)
            _attach(raw, _memfd(PAGE * 64), PAGE * 64)
            raw.sendall(
                b"\x00\x00\x00\x02hi"
                + encode_record(SLOT, 0, 100)
                + encode_record(SLOT, 2 * PAGE, 5)
                + encode_record(9, 0, 0)
            )
            receive = getattr(victim, call)
            got = await receive()
            assert (got if call != "recv_many" else got[0]) == b"hi"
            await turns_until(lambda: victim._read_failed is not None)  # all of it read
            for _ in range(2):
                with pytest.raises(ProtocolError, match="kind 9; the channel cannot be used"):
                    await receive()
            assert pool_mappings("") == maps  # the forged pool's mapping is gone
        forger.close()

    arun(main())


def test_attach_with_a_pipe_is_refused(arun: Run) -> None:
    async def main() -> None:
        victim, forger = udskit.aio.pair(shared_memory=True)
        async with victim:
            read, write = os.pipe()
            os.close(write)
            forger.socket.setblocking(True)
            _attach(forger.socket, read, PAGE)
            with pytest.raises(ProtocolError, match="not a memfd"):
                await victim.recv()
        forger.close()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_pooled_message_over_our_max_frame_says_what_to_raise(
    arun: Run, sockdir: Path, kind: str
) -> None:
    # It read "...; max_frame is 1048576", a ProtocolError: what the socket path calls
    # FrameTooLarge, without saying what to change.
    path = sockdir / "s"

    async def main() -> None:
        async with await udskit.aio.listen(path, type=kind, shared_memory=True) as listener:
            accepting = asyncio.ensure_future(listener.accept())
            client = await udskit.aio.connect(path, type=kind, shared_memory=True, max_frame=MIB)
            async with client, await accepting as server:
                await server.send(b"greeting")
                assert await client.recv() == b"greeting"
                await server.send(data(2 * MIB))  # through the pool: its max_frame is 16 MiB
                with pytest.raises(FrameTooLarge) as caught:
                    await client.recv()
        assert str(caught.value) == (
            f"{path}: peer announced a shared-memory message of {2 * MIB} bytes, over "
            f"max_frame ({MIB} bytes): give this end the peer's max_frame; the channel cannot "
            "be used any more: close it"
        )

    arun(main())


@pytest.mark.parametrize("server_layer", ["aio", "blocking"])
def test_both_layers_speak_the_same_protocol(arun: Run, sockdir: Path, server_layer: str) -> None:
    """An aio client with a blocking listener, and a blocking client with an aio one."""
    path = sockdir / "s"
    message = data(MIB, 3)

    def blocking_side(listener: udskit.Listener | None) -> bool:
        if listener is not None:
            with listener.accept() as channel:
                for got in channel:
                    channel.send(got)
                return channel.shared_memory
        with udskit.connect(path, shared_memory=True) as channel:
            channel.send(b"hi")
            assert channel.recv() == b"hi"
            channel.send(message)
            with channel.recv_view() as view:
                assert view == message
            return channel.shared_memory

    async def main() -> None:
        if server_layer == "blocking":
            with udskit.listen(path, shared_memory=True) as listener:
                served = asyncio.get_running_loop().run_in_executor(None, blocking_side, listener)
                async with await udskit.aio.connect(path, shared_memory=True) as channel:
                    await channel.send(b"hi")
                    assert await channel.recv() == b"hi"
                    await channel.send(message)
                    with await channel.recv_view() as view:
                        assert view == message
                    assert channel.shared_memory
                assert await served
        else:
            async with await udskit.aio.listen(path, shared_memory=True) as listener:
                client = asyncio.get_running_loop().run_in_executor(None, blocking_side, None)
                async with await listener.accept() as channel:
                    assert channel.shared_memory
                    async for got in channel:
                        await channel.send(got)
                assert await client

    arun(main())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"type": "dgram"}, "type='stream'.*or type='seqpacket'"),
        ({"framing": "raw"}, "framing='length'"),
        ({"max_fds": 0}, "max_fds"),
        ({"shared_memory": "yes"}, "shared_memory must be"),
        ({"bind": "@x"}, "bind="),
    ],
)
def test_aio_refuses_options_shared_memory_cannot_work_with(
    arun: Run, sockdir: Path, options: dict[str, object], match: str
) -> None:
    opts = {"shared_memory": True, **options}

    async def main() -> None:
        if "bind" not in options:
            with pytest.raises(ValueError, match=match):
                udskit.aio.pair(**opts)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=match):
                await udskit.aio.listen(sockdir / "s", **opts)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=match):
            await udskit.aio.connect(sockdir / "s", **opts)  # type: ignore[arg-type]

    arun(main())
    assert not (sockdir / "s").exists()


def test_loan_refuses_bad_sizes(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=True)
        async with a, b:
            for size in (0, -1, True, "1", 16 * MIB + 1):
                with pytest.raises(ValueError, match="loan: size"):
                    await a.loan(size)  # type: ignore[arg-type]

    arun(main())


def test_the_receiver_maps_the_pool_read_only(arun: Run) -> None:

    async def main() -> None:
        a, b = udskit.aio.pair(shared_memory=4 * MIB)
        async with a, b:
            await a.send(data(MIB))
            view = await b.recv_view()
            with open("/proc/self/maps") as maps:
                pools = [line for line in maps if "udskit-pool" in line]
            assert len(pools) == 2  # a's (read-write) and b's mapping of it (read-only)
            assert sorted(line.split()[1][:2] for line in pools) == ["r-", "rw"]
            view.release()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_servers_with_shared_memory(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "s"
    message = data(MIB, 4)

    async def echo(channel: udskit.aio.Channel) -> None:
        async for got in channel:
            await channel.send(got)

    async def main() -> None:
        server = await udskit.aio.start_server(path, echo, shared_memory=True, type=kind)
        serving = asyncio.ensure_future(server.serve_forever())
        try:
            async with await udskit.aio.connect(
                path,
                shared_memory=True,
                type=kind,  # type: ignore[arg-type]
            ) as channel:
                await channel.send(b"hi")
                assert await channel.recv() == b"hi"
                await channel.send(message)
                assert await channel.recv() == message
                assert channel.shared_memory
        finally:
            server.stop()
            await serving
        with pytest.raises(ValueError, match="message server"):
            await udskit.aio.start_message_server(
                sockdir / "m", lambda conn, msg: msg, shared_memory=True
            )
        assert not (sockdir / "m").exists()

    arun(main())
