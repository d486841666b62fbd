"""``udskit.aio`` with ``shared_memory=True`` on seqpacket: the same tagged packets as the
blocking layer (tests/integration/test_shared_memory_seqpacket.py has the faults in full),
driven from the event loop; both layers talking to each other; plain peers."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.proto.shm import PAGE, SHARED_THRESHOLD, SLOT

from ..conftest import open_fds
from ..integration.test_shared_memory import _memfd, data, pool_mappings
from ..integration.test_shared_memory_seqpacket import EMSGSIZE_WORDS, _attach, _records

Run = Callable[[Coroutine[Any, Any, Any]], Any]

MIB = 1024 * 1024
SEQ = {"type": "seqpacket"}
#: Bound for every wait in this file.
WAIT = 20.0


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    """Fail the test if it leaves a descriptor or a pool mapping behind."""
    fds, maps = open_fds(), pool_mappings("")
    yield
    leaked = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
    assert pool_mappings("") == maps, "a shared-memory mapping was left behind"


def test_pair_moves_large_messages_through_the_pool(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=2 * MIB)
        async with a, b:
            assert a.shared_memory
            await a.send(b"small")
            await a.send(data(MIB, 1))
            assert a.pool_in_use == MIB
            assert await b.recv() == b"small"
            view = await b.recv_view()
            assert view.readonly
            assert view == data(MIB, 1)
            loan = await a.loan(MIB)
            loan[:4] = b"loan"
            await a.send(loan)
            a.settimeout(0.05)
            with pytest.raises(Timeout, match="pool stayed full"):  # b holds both slots
                await a.send(data(MIB))
            a.settimeout(None)
            sending = asyncio.ensure_future(a.send(data(MIB, 7)))
            await asyncio.sleep(0)
            assert not sending.done()
            view.release()  # the release reaches a's reader: the send completes
            await sending
            assert (await b.recv())[:4] == b"loan"
            assert await b.recv() == data(MIB, 7)
            await b.send(b"sync")
            assert await a.recv() == b"sync"
            assert a.pool_in_use == 0

    arun(main())


def test_tasks_sending_at_once_while_the_socket_is_full(arun: Run) -> None:
    """The first large message carries the pool; the others' slots must not overtake it
    while its packet waits for room in the socket, nor go without it if it is cancelled."""

    async def main() -> None:
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=8 * MIB)
        async with a, b:
            filler = 0
            while True:  # fill the socket with tagged messages, as a would send them
                try:
                    a.socket.send(b"\x00" + bytes(16 * 1024))
                except BlockingIOError:
                    break
                filler += 1
            sends = [asyncio.ensure_future(a.send(data(MIB, seed))) for seed in range(6)]
            await asyncio.sleep(0)
            assert not any(send.done() for send in sends)
            # The task carrying the pool gives up: the next one carries it instead.
            sends[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await sends[0]
            for _ in range(filler):
                assert await b.recv() == bytes(16 * 1024)
            await asyncio.gather(*sends[1:])
            got = sorted([await b.recv() for _ in range(5)])
            assert got == sorted(data(MIB, seed) for seed in range(1, 6))

    arun(main())


def test_forged_packets_close_the_channel(arun: Run) -> None:
    async def main() -> None:
        for packets, match in (
            ([_records((SLOT, 0, 100))], "before its pool"),
            ([b"\x07"], "unknown shared-memory tag"),
            (["unsealed"], "not sealed"),
        ):
            victim, forger = udskit.aio.pair(type="seqpacket", shared_memory=True)
            async with victim:
                raw = forger.socket
                raw.setblocking(True)
                for packet in packets:
                    if packet == "unsealed":
                        _attach(raw, _memfd(PAGE * 64, seals=0), PAGE * 64)
                    else:
                        raw.send(packet)  # type: ignore[arg-type]
                with pytest.raises(ProtocolError, match=match):
                    await victim.recv()
                with pytest.raises(ProtocolError, match="cannot be used"):
                    await victim.recv()
                with pytest.raises(ConnectionClosed):
                    await victim.send(b"x")
            forger.close()

    arun(main())


@pytest.mark.parametrize("server_layer", ["aio", "blocking"])
def test_both_layers_speak_the_same_packets(arun: Run, sockdir: Path, server_layer: str) -> None:
    path = sockdir / "s"
    message = data(MIB, 3)

    def blocking_side(listener: udskit.Listener | None) -> bool:
        if listener is not None:
            with listener.accept() as channel:
                channel.send(b"greeting")
                for got in channel:
                    channel.send(got)
                return channel.shared_memory
        with udskit.connect(path, type="seqpacket", shared_memory=True) as channel:
            assert channel.recv() == b"greeting"
            channel.send(message)
            with channel.recv_view() as view:
                assert view == message
            return channel.shared_memory

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if server_layer == "blocking":
            with udskit.listen(path, type="seqpacket", shared_memory=True) as listener:
                served = loop.run_in_executor(None, blocking_side, listener)
                async with await udskit.aio.connect(path, shared_memory=True, **SEQ) as channel:  # type: ignore[arg-type]
                    assert await channel.recv() == b"greeting"
                    assert channel.shared_memory
                    await channel.send(message)
                    with await channel.recv_view() as view:
                        assert view == message
                assert await served
        else:
            async with await udskit.aio.listen(path, shared_memory=True, **SEQ) as listener:  # type: ignore[arg-type]
                client = loop.run_in_executor(None, blocking_side, None)
                async with await listener.accept() as channel:
                    assert channel.shared_memory
                    await channel.send(b"greeting")
                    async for got in channel:
                        await channel.send(got)
                assert await client

    arun(main())


def test_plain_peers_see_plain_packets(arun: Run, sockdir: Path) -> None:
    """A client that did not opt in gets no hello from an aio listener that did; a server
    that did not opt in gets no tag from an aio client that did."""
    path = str(sockdir / "s")

    async def main() -> None:
        async with await udskit.aio.listen(path, shared_memory=True, **SEQ) as listener:  # type: ignore[arg-type]
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
                raw.connect(path)
                async with await listener.accept() as channel:
                    assert not channel.shared_memory
                    await channel.send(b"hi")
                    raw.send(b"\x01plain")
                    assert await channel.recv() == b"\x01plain"
                assert raw.recv(100) == b"hi"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
            server.bind(path)
            server.listen()
            async with await udskit.aio.connect(path, shared_memory=True, **SEQ) as channel:  # type: ignore[arg-type]
                conn, _ = server.accept()
                with conn:
                    conn.send(b"first")
                    assert await channel.recv() == b"first"
                    assert not channel.shared_memory
                    await channel.send(data(200_000))  # above the threshold: the socket
                    assert conn.recv(MIB) == data(200_000)

    arun(main())


def _rights(*fds: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def test_a_message_lost_while_a_sender_waits_for_the_pool(arun: Run) -> None:
    """The loss is reported in its place, and reading goes on: the release behind it
    reaches the waiting sender (as in the blocking layer)."""

    async def main() -> None:
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=SHARED_THRESHOLD, max_fds=1)
        async with a, b:
            await a.send(data(SHARED_THRESHOLD))
            held = await b.recv_view()  # a's pool is full until b releases this
            fds = [_memfd(PAGE), _memfd(PAGE)]
            for packet in (b"\x00one", b"\x00two descriptors", b"\x00three", b"\x00four"):
                b.socket.sendmsg([packet], _rights(*fds) if b"two" in packet else [])
            b.socket.sendmsg([b"\x00five descriptors"], _rights(*fds))
            for fd in fds:
                os.close(fd)
            a.settimeout(WAIT)
            sending = asyncio.ensure_future(a.send(data(SHARED_THRESHOLD, 1)))
            await asyncio.sleep(0)
            held.release()  # the release goes behind the packets above
            await sending
            assert await a.recv_many() == [b"one"]  # up to the loss
            with pytest.raises(ProtocolError, match="max_fds"):
                await a.recv_many()
            assert await a.recv_many() == [b"three", b"four"]
            with pytest.raises(ProtocolError, match="max_fds"):
                await a.recv_view()
            with await b.recv_view() as view:
                assert view == data(SHARED_THRESHOLD, 1)

    arun(main())


def test_an_exception_while_a_packet_is_taken_in_ends_reading(
    arun: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet read and then dropped by an exception that is not ours (MemoryError
    here) may have been a record: as in the blocking layer, reading ends there, rather
    than going on with the pools out of step."""
    import udskit.aio.channel as aio_channel

    real = aio_channel.take_packet
    calls = 0

    def failing(*args: Any) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise MemoryError
        return real(*args)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=True)
        async with a, b:
            await b.send(b"one")
            await b.send(b"two")
            monkeypatch.setattr(aio_channel, "take_packet", failing)
            a.settimeout(WAIT)
            with pytest.raises(ProtocolError, match="interrupted"):
                await a.recv()
            with pytest.raises(ProtocolError, match="interrupted"):
                await a.recv()
        assert [type(context["exception"]) for context in errors] == [MemoryError]

    arun(main())


def test_send_many_takes_large_messages_through_the_pool(arun: Run) -> None:
    async def main() -> None:
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=True)
        async with a, b:
            await a.send_many([b"small", data(MIB, 1), b"last"])
            assert a.pool_in_use == MIB
            assert await b.recv() == b"small"
            assert await b.recv() == data(MIB, 1)
            assert await b.recv() == b"last"

    arun(main())


def test_a_large_message_the_socket_refuses_says_why_the_pool_was_not_used(
    arun: Run, sockdir: Path
) -> None:
    path = str(sockdir / "plain")

    async def main() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
            server.bind(path)
            server.listen()
            async with await udskit.aio.connect(path, shared_memory=True, **SEQ) as channel:  # type: ignore[arg-type]
                conn, _ = server.accept()
                with conn:
                    with pytest.raises(FrameTooLarge, match="must receive the listener's"):
                        await channel.send(data(MIB))
                    conn.send(b"first")
                    assert await channel.recv() == b"first"
                    with pytest.raises(FrameTooLarge, match="listener did not opt in"):
                        await channel.send(data(MIB))

    arun(main())


def test_lost_messages_count_against_the_read_ahead(arun: Run) -> None:
    """A peer sending packets that are all lost while our sender waits for pool space:
    reading stops after as many packets as the read ahead holds, as for messages."""
    flood = 2000

    async def main() -> None:
        a, b = udskit.aio.pair(type="seqpacket", shared_memory=SHARED_THRESHOLD, max_fds=1)
        async with a, b:
            await a.send(data(SHARED_THRESHOLD))
            held = await b.recv_view()
            raw = socket.socket(fileno=os.dup(b.socket.fileno()))
            raw.settimeout(WAIT)
            fds = [_memfd(PAGE), _memfd(PAGE)]
            sent = 0

            def send_lost() -> None:
                nonlocal sent
                try:
                    for _ in range(flood):
                        raw.sendmsg([b"\x00lost"], _rights(*fds))
                        sent += 1
                except OSError:
                    pass  # a closed: the end of the test

            loop = asyncio.get_running_loop()
            flooding = loop.run_in_executor(None, send_lost)
            try:
                a.settimeout(0.5)
                with pytest.raises(Timeout, match="pool stayed full"):
                    await a.send(data(SHARED_THRESHOLD))
                assert sent < flood  # a stopped reading: the rest waits in the peer
            finally:
                a.close()
                await flooding
                raw.close()
                for fd in fds:
                    os.close(fd)
            held.release()

    arun(main())


def test_a_message_the_pool_cannot_take_says_why(arun: Run) -> None:
    # It said only the socket's words, whose advice (type='stream') does not fit a channel
    # with shared memory: the message was over the pool (or over max_frame).
    async def main() -> None:
        a, b = udskit.aio.pair("seqpacket", shared_memory=MIB)
        async with a, b:
            with pytest.raises(FrameTooLarge) as over_pool:
                await a.send(bytes(2 * MIB))
            assert str(over_pool.value) == (
                f"{EMSGSIZE_WORDS}; our shared-memory pool holds {MIB} bytes, so this message "
                f"of {2 * MIB} went through the socket: give shared_memory= a pool that holds it"
            )
            await a.send(b"still fine")
            assert await b.recv() == b"still fine"

    arun(main())
