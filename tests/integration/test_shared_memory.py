"""Large messages through shared memory: real sockets, real memfds, real processes.

Faults come from a scripted peer: the far end of a pair, written to through its raw socket
with hand-made records and descriptors.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Channel, ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.channel import ARRIVED_MAX, POOL_WAIT
from udskit.freshbytes import FRESH_MIN
from udskit.proto.shm import (
    ATTACH,
    CONTROL_BIT,
    DEFAULT_POOL,
    OFFER,
    PAGE,
    RELEASE,
    SHARED_THRESHOLD,
    SLOT,
    VERSION,
    Pool,
    encode_record,
)
from udskit.shm import SharedMemory, create_pool, map_peer_pool

from ..conftest import open_fds

MIB = 1024 * 1024
BIG = 1 * MIB
#: The smallest pool the option accepts holds one message of this size and no second one.
SMALL_POOL = SHARED_THRESHOLD
#: Bound for every wait on another thread or process in this file.
WAIT = 20.0
#: The collector's thresholds, put back after a test that moves them.
THRESHOLDS = gc.get_threshold()


def pool_mappings(name: str = "udskit-pool") -> int:
    """Our mappings of memfds called ``name`` (udskit's pools, ours and peers'), from
    /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        return sum(f"memfd:{name}" in line for line in maps)


def data(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256) + b"x" * (size % 256)


@pytest.fixture
def clean() -> Iterator[None]:
    """Fail the test if it leaves a descriptor or a pool mapping behind."""
    fds, maps = open_fds(), pool_mappings("")  # every memfd: forged pools too
    yield
    leaked = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
    assert pool_mappings("") == maps, "a shared-memory mapping was left behind"


@pytest.fixture
def shm_pair(clean: None) -> Iterator[tuple[Channel, Channel]]:
    a, b = udskit.pair(shared_memory=True)
    with a, b:
        yield a, b


# -- the path itself ----------------------------------------------------------------------------


def test_large_messages_go_through_the_pool_small_ones_through_the_socket(
    shm_pair: tuple[Channel, Channel],
) -> None:
    a, b = shm_pair
    assert a.shared_memory
    assert b.shared_memory
    a.send(b"small")
    assert a.pool_in_use == 0
    message = data(BIG)
    a.send(message)
    assert a.pool_in_use == BIG  # lent to b until b is done with it
    assert b.recv() == b"small"
    assert b.recv() == message  # copied out, so released at once
    b.send(b"sync")  # b's release precedes this on the wire
    assert a.recv() == b"sync"
    assert a.pool_in_use == 0


def test_a_message_copied_out_into_fresh_memory_is_whole(clean: None) -> None:
    """From FRESH_MIN up, recv() fills a bytes made for it: every byte arrives, the copy
    is an ordinary bytes object, and the slot is released."""
    size = FRESH_MIN + 12345  # not a whole number of pages
    block = os.urandom(1 << 20)
    message = (block * (size // len(block) + 1))[:size]
    a, b = udskit.pair(shared_memory=2 * size, max_frame=size)
    with a, b:
        a.send(message)
        got = b.recv()
        assert type(got) is bytes
        assert len(got) == size
        assert got == message
        assert hash(got) == hash(message)
        b.send(b"sync")
        assert a.recv() == b"sync"
        assert a.pool_in_use == 0


def test_recv_view_is_read_only_and_holds_its_slot_until_released(
    shm_pair: tuple[Channel, Channel],
) -> None:
    a, b = shm_pair
    message = data(BIG, seed=3)
    a.send(message)
    view = b.recv_view()
    assert view.readonly
    assert view == message
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]
    derived = view[10:20]  # a slice keeps the slot as well, like numpy.frombuffer
    view.release()
    b.send(b"sync")
    assert a.recv() == b"sync"
    assert a.pool_in_use == BIG
    assert bytes(derived) == message[10:20]
    del derived  # the last view gone: now released
    b.send(b"sync")
    assert a.recv() == b"sync"
    assert a.pool_in_use == 0


def test_a_held_view_is_never_changed_by_the_sender(clean: None) -> None:
    a, b = udskit.pair(shared_memory=4 * MIB)
    with a, b:
        first = data(BIG, seed=1)
        a.send(first)
        with b.recv_view() as held:
            # Cycle far more than the pool through while we hold the first message.
            for seed in range(2, 14):
                a.send(data(BIG, seed=seed))
                assert b.recv() == data(BIG, seed=seed)
            assert held == first


def test_loan_is_sent_without_a_copy_and_is_then_gone(shm_pair: tuple[Channel, Channel]) -> None:
    a, b = shm_pair
    loan = a.loan(BIG)
    assert not loan.readonly
    assert a.pool_in_use == BIG
    loan[:4] = b"head"
    loan[-4:] = b"tail"
    a.send(loan)
    with pytest.raises(ValueError, match="released"):
        loan[0] = 1  # after send() the buffer belongs to the receiver
    with b.recv_view() as view:
        assert len(view) == BIG
        assert view[:4] == b"head"
        assert view[-4:] == b"tail"


def test_a_loan_sent_twice_or_a_strided_buffer_is_refused_in_the_words_of_the_api(
    shm_pair: tuple[Channel, Channel],
) -> None:
    a, b = shm_pair
    loan = a.loan(BIG)
    loan[:] = data(BIG)
    a.send(loan)
    for send in (a.send, lambda m: a.send_many([m])):
        with pytest.raises(ValueError, match=r"^send: this memoryview was released .* new loan"):
            send(loan)  # the first send released it
        with pytest.raises(TypeError, match=r"^send: a message is one contiguous block"):
            send(memoryview(bytes(2 * SHARED_THRESHOLD))[::2])
    a.send(b"after")  # nothing went, and the channel is whole
    assert b.recv() == data(BIG)
    assert b.recv() == b"after"


def test_a_loan_whose_send_fails_is_given_up_and_one_from_another_channel_is_copied(
    clean: None,
) -> None:
    a, b = udskit.pair(shared_memory=2 * BIG)
    c, d = udskit.pair(shared_memory=2 * BIG)
    with a, b, c, d:
        other = c.loan(BIG)
        other[:] = data(BIG, 1)
        a.send(other)  # not a's loan: copied into a's pool
        assert b.recv() == data(BIG, 1)
        assert bytes(other[:4]) == data(BIG, 1)[:4]  # still c's, still lent
        assert c.pool_in_use == BIG
        other.release()
        assert c.pool_in_use == 0
        a.settimeout(0)
        sent = 0
        while sent < 100_000:  # bounded: a socket buffer holds far less
            try:
                a.send(bytes(1000))
            except Timeout:
                break
            sent += 1
        assert sent < 100_000
        loan = a.loan(BIG)
        loan[:] = data(BIG, 2)
        with pytest.raises(Timeout, match="would block"):
            a.send(loan)  # the socket is full: the slot cannot go
        with pytest.raises(ValueError, match="released"):
            len(loan)  # given up
        assert a.pool_in_use == 0
        for _ in range(sent):
            assert b.recv() == bytes(1000)
        a.settimeout(WAIT)
        a.send(data(BIG, 3))
        assert b.recv() == data(BIG, 3)


def test_a_bad_record_read_while_a_loan_is_being_sent(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread reads a bad record, and closes the pools, while send(loan) hands the
    loan over: the send says the channel closed after a protocol error."""
    victim, peer = udskit.pair(shared_memory=True)
    with victim, peer:
        loan = victim.loan(BIG)
        moves = [lambda: victim._shared_failed(ProtocolError("injected bad record"))]

        def move() -> None:
            with contextlib.suppress(ProtocolError):  # the reader's to raise
                moves.pop()()

        def ref(target: object, *callback: object) -> object:
            if moves:  # in a thread of its own, as a reader: its error's frames are its own
                reader = threading.Thread(target=move)
                reader.start()
                reader.join(WAIT)
            return weakref.ref(target, *callback)  # type: ignore[arg-type]

        shim = types.SimpleNamespace(ref=ref, finalize=weakref.finalize)
        monkeypatch.setattr("udskit.shm.weakref", shim)  # hand_over's look at the loan
        with pytest.raises(ConnectionClosed, match="protocol error: injected bad record"):
            victim.send(loan)
        assert not moves


def test_a_loan_still_referenced_is_not_sent(shm_pair: tuple[Channel, Channel]) -> None:
    a, b = shm_pair
    loan = a.loan(BIG)
    exported = pickle.PickleBuffer(loan)  # an export of the loan itself
    with pytest.raises(ValueError, match="still in use"):
        a.send(loan)
    exported.release()
    a.send(loan)  # usable again once the export is gone
    assert len(b.recv()) == BIG
    b.send(b"sync")
    assert a.recv() == b"sync"
    assert a.pool_in_use == 0
    # A view made from the loan (not an export of it) could still write after the send.
    loan = a.loan(BIG)
    derived = loan[:10]
    with pytest.raises(ValueError, match="given up"):
        a.send(loan)
    assert a.pool_in_use == BIG
    derived[0] = 1  # still memory we own: nothing was sent
    del derived
    assert a.pool_in_use == 0


def test_a_loan_sent_while_a_numpy_array_of_it_lives_is_given_up(
    shm_pair: tuple[Channel, Channel],
) -> None:
    # The docs had a NumPy array as "an export" (delete it and send again), but numpy takes
    # a view of its own: the loan is given up, and the message says to delete it first.
    np = pytest.importorskip("numpy")  # a test dependency; the library never imports it
    a, b = shm_pair
    loan = a.loan(BIG)
    filled = np.frombuffer(loan, dtype=np.uint8)
    filled[:] = 7
    with pytest.raises(ValueError) as caught:
        a.send(loan)
    assert str(caught.value) == (
        "send(): views or arrays made from the loaned buffer (slices, numpy.frombuffer) are "
        "still alive and could change it after sending; it was not sent and is given up (its "
        "space returns when they are gone): take a new loan, and delete what you made from "
        "it before send()"
    )
    assert a.pool_in_use == BIG
    del filled
    assert a.pool_in_use == 0
    loan = a.loan(BIG)
    filled = np.frombuffer(loan, dtype=np.uint8)
    filled[:] = 8
    del filled  # as examples/shm_numpy.py does
    a.send(loan)
    assert b.recv() == bytes([8]) * BIG


def test_channels_dropped_without_close_give_their_pools_back(clean: None) -> None:
    """A program that drops its channels (no close(), no with block) leaks no pool: each is
    unmapped once the channel and every view into it are gone; the descriptors go too
    (the fixture checks both)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the sockets, dropped unclosed
        a, b = udskit.pair(shared_memory=4 * MIB)
        a.send(data(BIG))
        view = b.recv_view()
        loan = a.loan(BIG)  # our pool's descriptor is still ours: nothing sent since
        before = pool_mappings()
        del a, b
        gc.collect()
        assert pool_mappings() == before  # the view and the loan still need them
        assert bytes(view) == data(BIG)
        del view, loan
        gc.collect()
        assert pool_mappings() == before - 2


def test_a_loan_released_unsent_gives_its_space_back(shm_pair: tuple[Channel, Channel]) -> None:
    """Released without being sent (``release()``, a ``with`` block): the space is free
    again, and the channel keeps nothing of the loan (a program that gives loans up again
    and again does not grow it)."""
    a, _ = shm_pair
    for _ in range(3):
        loan = a.loan(BIG)
        assert a.pool_in_use == BIG
        loan.release()
        assert a.pool_in_use == 0
        with a.loan(BIG) as loan:
            loan[:1] = b"x"
        assert a.pool_in_use == 0
    assert not a._shm._loans  # type: ignore[union-attr]


def test_small_loans_and_loans_without_shared_memory_are_plain_buffers(clean: None) -> None:
    a, b = udskit.pair()
    with a, b:
        loan = a.loan(BIG)
        loan[:2] = b"ok"
        a.send(loan)
        assert b.recv()[:2] == b"ok"
        a.send(b"view")
        assert b.recv_view() == b"view"
    c, d = udskit.pair(shared_memory=True)
    with c, d:
        small = c.loan(100)
        assert c.pool_in_use == 0
        small[:] = b"s" * 100
        c.send(small)
        assert d.recv() == b"s" * 100


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "1", 16 * MIB + 1])
def test_loan_refuses_bad_sizes(shm_pair: tuple[Channel, Channel], size: object) -> None:
    a, _ = shm_pair
    with pytest.raises(ValueError, match="loan: size"):
        a.loan(size)  # type: ignore[arg-type]


def test_loan_on_a_closed_channel(clean: None) -> None:
    a, b = udskit.pair(shared_memory=True)
    a.close()
    b.close()
    for size in (BIG, 10):
        with pytest.raises(ConnectionClosed, match="closed"):
            a.loan(size)


def test_messages_above_the_pool_or_max_frame(clean: None) -> None:
    a, b = udskit.pair(shared_memory=SMALL_POOL, max_frame=2 * MIB)
    with a, b:
        message = data(BIG)
        a.send(message)  # larger than the pool: through the socket
        assert a.pool_in_use == 0
        assert b.recv() == message
        with pytest.raises(FrameTooLarge):
            a.send(bytes(2 * MIB + 1))


def test_send_many_on_a_stream_takes_loans_and_large_messages_through_the_pool(
    clean: None,
) -> None:
    # A pool of two messages: loans that send_many() copied through the socket instead of
    # handing them over would stay lent, and the third round could not take a loan.
    a, b = udskit.pair(shared_memory=2 * BIG)
    with a, b:
        a.settimeout(WAIT)
        for seed in range(3):
            loan = a.loan(BIG)
            loan[:] = data(BIG, seed)
            a.send_many([b"small", loan, data(BIG, seed + 1), b"last"])
            assert a.pool_in_use == 2 * BIG  # both went through the pool
            with pytest.raises(ValueError, match="released"):
                len(loan)  # handed over, as by send()
            assert b.recv() == b"small"
            with b.recv_view() as view:
                assert view == data(BIG, seed)
            assert b.recv() == data(BIG, seed + 1)
            assert b.recv() == b"last"


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_loan_taken_inside_send_many_is_refused_not_waited_for(clean: None, kind: str) -> None:
    a, b = udskit.pair(shared_memory=True, type=kind)  # type: ignore[call-overload]
    with a, b:
        a.settimeout(WAIT)

        def frames() -> Iterator[memoryview]:
            loan = a.loan(BIG)  # send_many holds a's sending side: it waited for ever
            loan[:] = data(BIG)
            yield loan

        with pytest.raises(RuntimeError, match=r"^loan\(\) inside the messages that send_many"):
            a.send_many(frames())
        loans = [a.loan(BIG) for _ in range(2)]  # taken first: the way to do it
        for seed, loan in enumerate(loans):
            loan[:] = data(BIG, seed)
        a.send_many(loans)
        assert [b.recv() for _ in loans] == [data(BIG, 0), data(BIG, 1)]


def test_send_fds_goes_through_the_socket(shm_pair: tuple[Channel, Channel]) -> None:
    """As docs/shared-memory.md says: a message with descriptors never uses the pool."""
    a, b = shm_pair
    read, write = os.pipe()
    with a, b:
        try:
            a.send_fds(data(SHARED_THRESHOLD, 3), [read])
            assert a.pool_in_use == 0
            message, fds = b.recv_fds()
            assert message == data(SHARED_THRESHOLD, 3)
            assert len(fds) == 1
            os.close(fds[0])
        finally:
            os.close(read)
            os.close(write)


def test_recv_many_and_iteration_deliver_in_order(shm_pair: tuple[Channel, Channel]) -> None:
    a, b = shm_pair
    sent = [b"one", data(BIG, 1), b"two", data(SHARED_THRESHOLD, 2)]
    for message in sent:
        a.send(message)
    a.close()
    got = b.recv_many()
    got += list(b)
    assert got == sent


def test_recv_many_returns_every_complete_message_one_read_brought(
    shm_pair: tuple[Channel, Channel],
) -> None:
    """As on a channel without shared memory: what one write (send_many of small
    messages) sent, one recv_many() returns."""
    a, b = shm_pair
    a.send_many([b"1", b"2", b"3"])
    assert b.recv_many() == [b"1", b"2", b"3"]


def resident_in_our_pool() -> int:
    """Bytes of our own pools (mapped read-write; a peer's are read-only) in memory, from
    /proc/self/smaps."""
    resident = 0
    mine = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's heading line
                mine = fields[1] == "rw-s" and "memfd:udskit-pool" in line
            elif mine and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


def kernel_at_least(major: int, minor: int) -> bool:
    numbers = os.uname().release.split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


@pytest.mark.skipif(not kernel_at_least(5, 14), reason="MADV_POPULATE_WRITE came in Linux 5.14")
def test_a_copy_into_a_fresh_part_of_the_pool_faults_it_in_at_once(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send() copying into pages of the pool no copy went into before has the kernel fault
    them in with one call, not a page fault per 4 KiB as it writes; pages copied into
    before are left alone. A loan is left to the program's writes: nothing of it is in
    memory before it writes (the pool costs only what is used), and a copy into its pages
    later is advised like any fresh ones."""
    advice: list[tuple[int, int]] = []
    real = udskit.shm._madvise

    def recorded(address: int, length: int, what: int) -> int:
        advice.append((length, what))
        return real(address, length, what)  # type: ignore[no-any-return]

    monkeypatch.setattr(udskit.shm, "_madvise", recorded)
    populate = udskit.shm._MADV_POPULATE_WRITE
    message = data(4 * MIB + 1)
    a, b = udskit.pair(shared_memory=16 * MIB)
    with a, b:
        before = resident_in_our_pool()
        a.send(message)  # offset 0
        assert advice == [(4 * MIB + PAGE, populate)]
        assert resident_in_our_pool() - before >= 4 * MIB + PAGE  # more with shmem huge pages
        assert b.recv() == message
        a.send(message)  # the same pages again (the release came in first): no advice
        assert b.recv() == message
        assert len(advice) == 1
        loan = a.loan(8 * MIB)  # offset 0 again: half of it never copied into
        resident = resident_in_our_pool()
        loan[6 * MIB : 6 * MIB + PAGE] = b"L" * PAGE  # the program writes one page of it
        assert resident_in_our_pool() - resident < 4 * MIB  # the rest is not in memory
        assert len(advice) == 1
        a.send(data(MIB))  # at 8 MiB: advised
        a.send(loan)
        del loan
        assert b.recv() == data(MIB)
        with b.recv_view() as view:  # the loan's pages, released
            assert bytes(view[6 * MIB : 6 * MIB + PAGE]) == b"L" * PAGE
        a.send(data(6 * MIB))  # at 0: into pages of the loan no copy went into
        assert b.recv() == data(6 * MIB)
        assert advice[1:] == [(MIB, populate), (6 * MIB, populate)]


# -- backpressure -------------------------------------------------------------------------------


def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded by WAIT) for another thread to reach a state it is bound to reach."""
    ready = threading.Event()
    for _ in range(int(WAIT * 1000)):
        if condition():
            return
        ready.wait(0.001)
    raise AssertionError("the condition never held")


def waits_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is inside ``function`` now."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def sending(channel: Channel, message: bytes) -> tuple[threading.Thread, list[BaseException]]:
    """A thread started to send ``message``, and the list its error goes to, if any."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            channel.send(message)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, errors


def test_a_loan_given_up_wakes_a_sender_waiting_for_room(clean: None) -> None:
    """The only thing on the socket for a sender waiting for room is the peer's releases; a
    loan of ours given up frees room too, and the waiting sender sees it (within POOL_WAIT)."""
    a, b = udskit.pair(shared_memory=SMALL_POOL)  # room for one message
    with a, b:
        a.settimeout(WAIT)
        loan = a.loan(SMALL_POOL)  # all of it
        sender, errors = sending(a, data(SMALL_POOL, 5))
        until(lambda: waits_in(sender, "_lend"))  # it waits for room
        loan.release()
        sender.join(WAIT)
        assert not sender.is_alive()
        assert not errors
        assert b.recv() == data(SMALL_POOL, 5)


def test_a_sender_waiting_for_room_lets_another_thread_send_its_loan(clean: None) -> None:
    """The pool is full of loans two threads hold; a third thread's send waits for room,
    which comes only once a loan is sent and released. The waiting send must not keep the
    others from sending (it held the write lock, and all three waited on each other)."""
    a, b = udskit.pair(shared_memory=2 * BIG)
    with a, b:
        a.settimeout(5.0)  # bounds the failure: the waiting send timed out
        first, second = a.loan(BIG), a.loan(BIG)
        first[:] = data(BIG, 1)
        second[:] = data(BIG, 2)
        sender, errors = sending(a, data(BIG, 3))
        until(lambda: waits_in(sender, "_lend"))  # it waits for room
        a.send(first)
        assert b.recv() == data(BIG, 1)  # released: room for the waiting send
        sender.join(WAIT)
        assert not sender.is_alive()
        assert not errors
        a.send(second)
        assert {b.recv(), b.recv()} == {data(BIG, 2), data(BIG, 3)}


def test_a_sender_waiting_for_room_while_another_breaks_the_channel_sends_nothing(
    clean: None,
) -> None:
    """The waiting send let go of the write lock; another thread's send then broke the
    stream (part of a frame went out). When room comes, the waiting send must say the
    channel is broken, and put no record after the broken frame."""
    a, b = udskit.pair(shared_memory=BIG)
    with a, b:
        a.settimeout(WAIT)
        a.send(data(BIG, 1))
        held = b.recv_view()  # the pool is full until this is released
        sender, errors = sending(a, data(BIG, 2))
        until(lambda: waits_in(sender, "_lend"))
        with a._wlock:  # another sender, cut off mid-frame (as _write does)
            a._break("a send failed after 10 of 20 bytes went out")
        held.release()
        sender.join(WAIT)
        assert not sender.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], ConnectionClosed)
        assert "a send failed after 10 of 20 bytes" in str(errors[0])
        with pytest.raises(ConnectionClosed):
            b.recv()  # the end of the stream: no slot came after the break


def test_senders_waiting_for_room_together_each_get_it(clean: None) -> None:
    """Two senders wait for room at once, looking for loans given up (a poll each time):
    each with a poll of its own (one shared poll object refuses a second caller, and the
    error broke the channel's reading)."""
    a, b = udskit.pair(shared_memory=2 * BIG)
    with a, b:
        a.settimeout(WAIT)
        loans = [a.loan(BIG), a.loan(BIG)]
        senders = [sending(a, data(BIG, seed)) for seed in range(2)]
        until(lambda: all(waits_in(sender, "_lend") for sender, _ in senders))
        for _ in range(20):  # both look, many times
            threading.Event().wait(POOL_WAIT)
        for loan in loans:
            loan.release()
        for sender, errors in senders:
            sender.join(WAIT)
            assert not sender.is_alive()
            assert not errors
        assert {b.recv(), b.recv()} == {data(BIG, 0), data(BIG, 1)}


def test_a_view_released_during_another_threads_send_is_released_after_it(
    clean: None,
) -> None:
    """The release cannot go out while another thread's send holds the socket; it goes
    when that send is done, not with some later call that may never come."""
    a, b = udskit.pair(shared_memory=SMALL_POOL)  # room for one message
    with a, b:
        a.settimeout(2.0)  # bounds the failure: with the release, the send takes no time
        b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        a.send(data(SMALL_POOL))
        view = b.recv_view()
        message = data(SHARED_THRESHOLD - PAGE, 1)  # through the socket, more than it holds
        sender, errors = sending(b, message)
        until(lambda: waits_in(sender, "_write"))  # blocked until a reads
        view.release()
        assert a.recv() == message
        sender.join(WAIT)
        assert not errors
        a.send(data(SMALL_POOL, 2))  # into the slot b released; b sends nothing more
        assert b.recv() == data(SMALL_POOL, 2)


def test_a_loan_sent_by_two_threads_at_once_goes_once(clean: None) -> None:
    a, b = udskit.pair(shared_memory=True)
    with a, b:
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        loan = a.loan(BIG)
        loan[:] = data(BIG, 1)
        blocker, _ = sending(a, data(SHARED_THRESHOLD - PAGE))  # holds the socket until b reads
        until(lambda: waits_in(blocker, "_write"))
        (one, one_errors), (two, two_errors) = sending(a, loan), sending(a, loan)  # type: ignore[arg-type]
        until(lambda: waits_in(one, "_send_shared") and waits_in(two, "_send_shared"))
        assert b.recv() == data(SHARED_THRESHOLD - PAGE)
        for thread in (blocker, one, two):
            thread.join(WAIT)
        errors = one_errors + two_errors
        assert len(errors) == 1
        assert isinstance(errors[0], ValueError)
        assert str(errors[0]) == "send(): the loaned buffer was sent already; take a new loan"
        assert b.recv() == data(BIG, 1)
        a.send(b"sync")
        assert b.recv() == b"sync"  # nothing else was sent


def test_views_ending_in_a_garbage_collection_leave_the_pool_whole(clean: None) -> None:
    """A view's end is seen by a callback, which a garbage collection can run in the middle
    of the pool's own bookkeeping (here: a loan given up, collected while send() lends; the
    collection is moved over every allocation there). The pool comes out whole, and no
    message is laid over one the receiver holds."""
    gc.freeze()  # what the process holds already: out of every collection below, for speed
    try:
        for collect_after in range(40):
            gc.collect()
            gc.disable()
            try:
                a, b = udskit.pair(shared_memory=4 * SMALL_POOL)
                with a, b:
                    first, second = a.loan(SMALL_POOL), a.loan(SMALL_POOL)
                    cycle: list[object] = [first[:]]  # a view made from the loan, in a cycle
                    cycle.append(cycle)
                    first.release()
                    del first, cycle  # garbage now: only a collection ends that view
                    gc.set_threshold(gc.get_count()[0] + collect_after)
                    gc.enable()
                    a.send(data(SMALL_POOL, 1))  # the collection runs somewhere in here
                    gc.collect()
                    held = [b.recv_view()]
                    for seed in (2, 3):
                        a.send(data(SMALL_POOL, seed))
                        held.append(b.recv_view())
                    assert [bytes(view) for view in held] == [
                        data(SMALL_POOL, n) for n in (1, 2, 3)
                    ]
                    for view in held:
                        view.release()
                    second.release()
                    b.send(b"sync")
                    assert a.recv() == b"sync"
                    assert a.pool_in_use == 0
            finally:
                gc.set_threshold(*THRESHOLDS)
                gc.enable()
    finally:
        gc.unfreeze()


def collect_inside(monkeypatch: pytest.MonkeyPatch, pool: Callable[[], object]) -> None:
    """Make ``Pool.release`` on the pool ``pool()`` run a garbage collection first, under
    the shared-memory lock: as any allocation there may start one."""
    original = Pool.release

    def release(self: Pool, offset: int) -> None:
        if self is pool():
            gc.collect()
        original(self, offset)

    monkeypatch.setattr(Pool, "release", release)


def test_a_view_ended_inside_the_lock_is_released_all_the_same(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A view whose end is seen by a garbage collection while its thread holds the
    shared-memory lock (here: taking in the peer's release as recv() reads): its release
    still goes out, and the peer, waiting for room, gets it while that recv() waits."""
    gc.disable()
    try:
        a, b = udskit.pair(shared_memory=SMALL_POOL)  # room for one message each way
        with a, b:
            b.settimeout(WAIT)
            b.send(data(SMALL_POOL, 1))
            view = a.recv_view()
            cycle: list[object] = [view]  # the view ends only in a collection
            cycle.append(cycle)
            del view, cycle
            a.send(data(SMALL_POOL, 2))
            assert b.recv() == data(SMALL_POOL, 2)  # its release is on its way to a
            collect_inside(monkeypatch, lambda: a._shm.pool)  # type: ignore[union-attr]
            got: list[bytes] = []
            receiver = threading.Thread(target=lambda: got.append(a.recv()))
            receiver.start()  # takes in the release; the collection ends the view there
            b.send(data(SMALL_POOL, 3))  # needs the room that view held
            receiver.join(WAIT)
            assert got == [data(SMALL_POOL, 3)]
    finally:
        gc.enable()


def test_a_release_behind_a_message_reaches_a_sender_holding_a_loan(clean: None) -> None:
    """recv() takes one message from a read and leaves the rest to be decoded later; a
    sender waiting for room (a loan of its own out) finds a release among that rest."""
    a, b = udskit.pair(shared_memory=2 * SMALL_POOL)
    with a, b:
        a.settimeout(WAIT)
        loan = a.loan(SMALL_POOL)
        a.send(data(SMALL_POOL, 1))  # the pool is full: the loan and this message
        sent = SMALL_POOL  # where first fit put the message, after the loan
        got: list[bytes] = []
        receiver = threading.Thread(target=lambda: got.append(a.recv()))
        receiver.start()
        until(lambda: waits_in(receiver, "_feed"))  # blocked in its read
        sender, errors = sending(a, data(SMALL_POOL, 2))
        until(lambda: waits_in(sender, "wait_for_space"))  # the receiver reads, not it
        # b, by hand: a small message and its release of that slot, in one write.
        b.socket.sendall(b"\x00\x00\x00\x01A" + encode_record(RELEASE, sent))
        receiver.join(WAIT)
        sender.join(WAIT)
        assert not sender.is_alive()
        assert got == [b"A"]
        assert not errors
        loan.release()


def test_a_slot_the_full_socket_refuses_after_the_pool_went_leaves_the_channel_whole(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first large message sends ATTACH, then SLOT. If the socket takes ATTACH and then
    has no room for SLOT (timeout 0), the stream is at a record boundary: nothing of the
    message went, so the send says so and the channel stays usable (it was broken)."""
    a, b = udskit.pair(shared_memory=True)
    with a, b:
        a.settimeout(0)
        real_send = socket.socket.send
        refused: list[bytes] = []

        def send(sock: socket.socket, data: bytes, *flags: int) -> int:
            if sock is a.socket and not refused and len(data) == len(encode_record(SLOT, 0, 1)):
                refused.append(bytes(data))
                raise BlockingIOError(11, "injected: the socket is full")
            return real_send(sock, data, *flags)

        monkeypatch.setattr(socket.socket, "send", send)
        with pytest.raises(Timeout, match="would block"):
            a.send(data(BIG, 1))
        assert refused
        assert a.pool_in_use == 0  # the slot is ours again
        a.send(data(BIG, 2))  # the pool is not sent again
        assert b.recv() == data(BIG, 2)


def test_a_receiver_that_never_releases_gets_backpressure_not_growth(clean: None) -> None:
    a, b = udskit.pair(shared_memory=2 * MIB)
    with a, b:
        a.send(data(BIG))
        a.send(data(BIG))
        held = [b.recv_view(), b.recv_view()]
        a.settimeout(0.05)
        with pytest.raises(Timeout, match="pool stayed full"):
            a.send(data(BIG))
        assert a.pool_in_use == 2 * MIB
        a.settimeout(None)
        # Released from another thread while the sender waits: the send completes.
        sender = threading.Thread(target=a.send, args=(data(BIG, 9),))
        sender.start()
        held.pop().release()
        sender.join(WAIT)
        assert not sender.is_alive()
        assert b.recv() == data(BIG, 9)
        held.pop().release()


def test_a_full_pool_says_who_holds_it_and_which_call_timed_out(clean: None) -> None:
    a, b = udskit.pair(shared_memory=2 * MIB)
    with a, b:
        a.settimeout(0)
        a.send(data(BIG))
        loan = a.loan(BIG)  # the pool is full: half at the receiver, half with us
        with pytest.raises(Timeout) as caught:
            a.loan(BIG)
        assert str(caught.value) == (
            "stream channel: the shared-memory pool stayed full for 0 s (the receiver holds "
            f"{BIG} bytes unreleased, and {BIG} bytes are in loans of ours not sent yet); "
            "loan timed out"
        )
        assert b.recv() == data(BIG)  # its release is read by the next send, at once
        a.send(data(BIG, 1))
        with pytest.raises(Timeout, match=rf"holds {BIG} bytes unreleased, and {BIG} .*; send t"):
            a.send(data(BIG, 2))
        loan.release()
        assert b.recv() == data(BIG, 1)


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_sender_waiting_for_releases_reads_ahead_a_bounded_amount(clean: None, kind: str) -> None:
    a, b = udskit.pair(shared_memory=SMALL_POOL, type=kind)  # type: ignore[call-overload]
    with a, b:
        a.send(data(SHARED_THRESHOLD))
        held = b.recv_view()  # a's pool is full from now on
        flood = [bytes(64 * 1024)] * 200  # 12.5 MiB of plain messages, no release
        flooding = threading.Thread(target=b.send_many, args=(flood,))
        flooding.start()
        a.settimeout(0.5)
        with pytest.raises(Timeout, match="pool stayed full"):
            a.send(data(SHARED_THRESHOLD))
        assert a._shm.arrived_bytes <= ARRIVED_MAX + 2 * 1024 * 1024  # type: ignore[union-attr]
        a.settimeout(WAIT)
        received = a.recv_many()
        while len(received) < len(flood):
            received += a.recv_many()
        assert received == flood
        flooding.join(WAIT)
        held.release()


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_sender_waiting_for_the_pool_while_another_thread_reads(clean: None, kind: str) -> None:
    a, b = udskit.pair(shared_memory=SMALL_POOL, type=kind)  # type: ignore[call-overload]
    with a, b:
        size = SHARED_THRESHOLD
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(a.recv()))
        reader.start()  # a's reader holds the read lock: the sender must not need it
        a.send(data(size, 1))
        blocked = threading.Thread(target=a.send, args=(data(size, 2),))
        blocked.start()
        assert b.recv() == data(size, 1)  # the release reaches a's reader thread
        blocked.join(WAIT)
        assert not blocked.is_alive()
        assert b.recv() == data(size, 2)
        b.send(b"done")
        reader.join(WAIT)
        assert got == [b"done"]


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_close_while_another_thread_copies_into_the_pool(clean: None, kind: str) -> None:
    """close() from another thread never unmaps memory a send is copying into, nor one a
    recv is copying out of: they end with ConnectionClosed, the process lives on."""
    a, b = udskit.pair(shared_memory=64 * MIB, max_frame=32 * MIB, type=kind)  # type: ignore[call-overload]
    message = data(16 * MIB)
    errors: list[BaseException] = []
    sent = threading.Event()

    def send_until_closed() -> None:
        try:
            for _ in range(1000):  # bounded; close() ends it long before
                a.send(message)
                sent.set()
        except ConnectionClosed as exc:
            errors.append(exc)

    def receive_until_closed() -> None:
        try:
            for _ in range(1000):
                b.recv()
        except ConnectionClosed as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=send_until_closed),
        threading.Thread(target=receive_until_closed),
    ]
    for thread in threads:
        thread.start()
    assert sent.wait(WAIT)
    a.close()
    b.close()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert len(errors) == 2


# -- negotiation --------------------------------------------------------------------------------


def _serve_one(listener: udskit.Listener, reply: bool = True) -> threading.Thread:
    def run() -> None:
        with listener.accept() as channel:
            for message in channel:
                if reply:
                    channel.send(message)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(("client", "server"), [(True, True), (True, False), (False, True)])
def test_listen_and_connect_agree(sockdir: Path, clean: None, client: bool, server: bool) -> None:
    path = sockdir / "s"
    with udskit.listen(path, shared_memory=server) as listener:
        thread = _serve_one(listener)
        with udskit.connect(path, shared_memory=client) as channel:
            message = data(BIG, 5)
            channel.send(message)  # the client sees the listener's offer, if any, first
            assert channel.recv() == message
            assert channel.shared_memory is (client and server)
            assert channel.pool_in_use == 0
            channel.send(message)
            assert channel.recv() == message
        thread.join(WAIT)


@pytest.mark.parametrize(("call", "step"), [("recv_view", "view"), ("recv", "copy_out")])
def test_a_close_between_a_receive_and_its_view_names_the_channel(
    sockdir: Path, clean: None, monkeypatch: pytest.MonkeyPatch, call: str, step: str
) -> None:
    """close() in another thread that lands after a receive took a message in the peer's
    pool, before its view (or copy) is made, fails that call naming the channel, as every
    ConnectionClosed does; it said only "the channel's shared-memory pool is closed"."""
    path = sockdir / "s"
    original = getattr(SharedMemory, step)
    with udskit.listen(path, shared_memory=True) as listener:
        thread = _serve_one(listener)
        with udskit.connect(path, shared_memory=True) as channel:

            def closed_first(shm: SharedMemory, lease: object) -> object:
                if threading.current_thread() is not receiver:  # the server's own recv()
                    return original(shm, lease)
                closer = threading.Thread(target=channel.close)  # the fault: close() lands here
                closer.start()
                closer.join(WAIT)
                return original(shm, lease)

            receiver = threading.current_thread()
            channel.send(data(BIG))
            monkeypatch.setattr(SharedMemory, step, closed_first)
            closed = f"^{re.escape(str(path))}: the channel was closed, and its shared-memory pool"
            with pytest.raises(ConnectionClosed, match=closed):
                getattr(channel, call)()
        thread.join(WAIT)


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_pooled_message_over_our_max_frame_says_what_to_raise(
    sockdir: Path, clean: None, kind: str
) -> None:
    # It read "...; max_frame is 1048576", a ProtocolError: what the socket path calls
    # FrameTooLarge, without saying what to change.
    path = sockdir / "s"
    with udskit.listen(path, type=kind, shared_memory=True) as listener:  # type: ignore[call-overload]
        accepted: list[Channel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()))
        thread.start()
        with udskit.connect(path, type=kind, shared_memory=True, max_frame=BIG) as client:  # type: ignore[call-overload]
            thread.join(WAIT)
            with accepted[0] as server:
                server.send(b"greeting")
                assert client.recv() == b"greeting"
                server.send(data(2 * BIG))  # through the pool: the server's max_frame is 16 MiB
                with pytest.raises(FrameTooLarge) as caught:
                    client.recv()
    assert str(caught.value) == (
        f"{path}: peer announced a shared-memory message of {2 * BIG} bytes, over max_frame "
        f"({BIG} bytes): give this end the peer's max_frame; the channel cannot be used any "
        "more: close it"
    )


def test_a_listener_that_did_not_opt_in_sees_only_the_messages(sockdir: Path, clean: None) -> None:
    path = str(sockdir / "plain")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with udskit.connect(path, shared_memory=True) as channel:
            conn, address = server.accept()
            with conn:
                assert address.startswith(b"\0udskit-shm/")  # the opt-in: a name, no byte
                channel.send(b"hello")
                channel.shutdown_write()
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                assert received == b"\0\0\0\x05hello"


def test_a_client_that_did_not_opt_in_gets_no_offer(sockdir: Path, clean: None) -> None:
    path = str(sockdir / "s")
    with udskit.listen(path, shared_memory=True) as listener, socket.socket(socket.AF_UNIX) as raw:
        raw.connect(path)
        with listener.accept() as channel:
            assert not channel.shared_memory
            channel.send(b"hi")
            channel.close()
            received = b""
            while chunk := raw.recv(65536):
                received += chunk
            assert received == b"\0\0\0\x02hi"


def test_a_pool_message_on_a_channel_that_did_not_opt_in(clean: None) -> None:
    a, b = udskit.pair()
    with a, b:
        b.socket.sendall(encode_record(OFFER, VERSION))
        with pytest.raises(ProtocolError):
            a.recv()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"type": "dgram"}, "type='stream'.*or type='seqpacket'"),
        ({"type": "seqpacket", "max_fds": 0}, "max_fds"),
        ({"framing": "lines"}, "framing='length'"),
        ({"max_fds": 0}, "max_fds"),
        ({"max_frame": CONTROL_BIT}, "max_frame"),
    ],
)
def test_shared_memory_refuses_options_it_cannot_work_with(
    sockdir: Path, options: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        udskit.pair(shared_memory=True, **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        udskit.listen(sockdir / "s", shared_memory=True, **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        udskit.connect(sockdir / "s", shared_memory=True, **options)  # type: ignore[arg-type]
    assert not (sockdir / "s").exists()


@pytest.mark.parametrize("value", ["yes", 1.5, -1, 100, 2**40])
def test_shared_memory_refuses_bad_values(sockdir: Path, value: object) -> None:
    for call in (
        lambda: udskit.pair(shared_memory=value),  # type: ignore[arg-type]
        lambda: udskit.listen(sockdir / "s", shared_memory=value),  # type: ignore[arg-type]
        lambda: udskit.connect(sockdir / "s", shared_memory=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="shared_memory must be"):
            call()


def test_shared_memory_refuses_bind_tcp_and_fd(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="bind="):
        udskit.connect(sockdir / "s", shared_memory=True, bind=sockdir / "c")
    with pytest.raises(ValueError, match="bind="):
        udskit.connect("fd:0", shared_memory=True)
    with pytest.raises(ValueError, match="tcp"):
        udskit.connect("tcp:127.0.0.1:1", shared_memory=True)
    with pytest.raises(ValueError, match="tcp"):
        udskit.listen("tcp:127.0.0.1:0", shared_memory=True)


def test_our_pool_is_sealed_before_the_peer_sees_it(clean: None) -> None:
    fd, mapping = create_pool(4 * MIB, "test pool")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert os.fstat(fd).st_size == 4 * MIB
        with pytest.raises(PermissionError):
            os.ftruncate(fd, MIB)  # no one can shrink it under a reader
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # nor change the seals
        peer = map_peer_pool(os.dup(fd), 4 * MIB, "test pool")  # what a receiver accepts
        assert not peer.writable
        peer.close()
    finally:
        os.close(fd)
        mapping.close()


# -- a peer that misbehaves ---------------------------------------------------------------------


def _memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> int:
    fd = os.memfd_create("forged", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _attach(raw: socket.socket, fd: int, size: int) -> None:
    fds = array.array("i", [fd]).tobytes()
    raw.sendmsg([encode_record(ATTACH, size)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    os.close(fd)


def _expect_closed_by(victim: Channel, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        victim.recv()
    with pytest.raises(ProtocolError, match="cannot be used"):
        victim.recv()
    with pytest.raises(ConnectionClosed):
        victim.send(b"x")
    with pytest.raises(ConnectionClosed, match="protocol error"):
        victim.loan(1)  # below any max_frame: the state is refused, not the size


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([(SLOT, 0, 100)], "before its pool"),
        ([("attach",), (SLOT, PAGE * 64, 100)], "outside its pool"),
        ([("attach",), (SLOT, 1, 100)], "outside its pool"),
        ([("attach",), (SLOT, 0, 16 * MIB + 1)], "max_frame"),
        ([("attach",), (SLOT, 0, 0)], "message of 0 bytes"),
        ([("attach",), ("attach",)], "second"),
        ([(RELEASE, 0, 0)], "never sent"),
        ([(OFFER, VERSION, 0)], "only a listener"),
        ([(9, 0, 0)], "unknown"),
    ],
)
def test_forged_records_close_the_channel(
    clean: None, records: list[tuple[object, ...]], match: str
) -> None:
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        raw = forger.socket
        for record in records:
            if record == ("attach",):
                _attach(raw, _memfd(PAGE * 64), PAGE * 64)
            elif record[0] == 9:  # a record kind that does not exist
                raw.sendall((CONTROL_BIT | 17).to_bytes(4, "big") + b"\x09" + bytes(16))
            else:
                raw.sendall(encode_record(*record))  # type: ignore[arg-type]
        _expect_closed_by(victim, match)


@pytest.mark.parametrize("size", [0, 5, 300, 0x7FFF_FFFF], ids=["empty", "short", "long", "2-GiB"])
def test_a_record_of_the_wrong_size_closes_the_channel(clean: None, size: int) -> None:
    maps = pool_mappings()
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        forger.send(data(BIG))  # the forger's pool, mapped by both
        forger.socket.sendall((CONTROL_BIT | size).to_bytes(4, "big") + bytes(min(size, 300)))
        assert victim.recv() == data(BIG)
        _expect_closed_by(victim, rf"record of {size if 0 < size <= 256 else 0} bytes")
        assert pool_mappings() == maps + 1  # the victim's mapping is gone, the forger's not


def test_a_slot_over_one_still_held_closes_the_channel(clean: None) -> None:
    """The first message is whole and is received; the next slot, laid over it while the
    receiver still holds it, closes the channel."""
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        raw = forger.socket
        _attach(raw, _memfd(PAGE * 64), PAGE * 64)
        raw.sendall(encode_record(SLOT, 0, 100) + encode_record(SLOT, 0, 100))
        with victim.recv_view() as view:
            assert len(view) == 100
            _expect_closed_by(victim, "overlaps")


def _pipe_end() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def _tmpfs_file(size: int) -> int:
    """A shmem file that is not a memfd (O_TMPFILE in /dev/shm): it carries no seals."""
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _memfd(PAGE * 16, seals=0), "not sealed"),
        (lambda: _memfd(PAGE * 16, seals=fcntl.F_SEAL_GROW), "not sealed"),
        (lambda: os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC), "not a memfd"),
        (_pipe_end, "not a memfd"),
        (lambda: socket.socket(socket.AF_UNIX).detach(), "not a memfd"),
        (lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "not a memfd"),
        (lambda: os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC), "not a memfd"),
        (lambda: _tmpfs_file(PAGE * 16), "not sealed"),
        (lambda: _memfd(PAGE * 8), "not the"),
    ],
    ids=[
        "unsealed",
        "shrinkable",
        "regular-file",
        "pipe",
        "socket",
        "directory",
        "device",
        "tmpfs-file",
        "wrong-size",
    ],
)
def test_bad_pool_descriptors_are_refused(clean: None, make: Callable[[], int], match: str) -> None:
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        _attach(forger.socket, make(), PAGE * 16)
        _expect_closed_by(victim, match)


def _no_huge_pages() -> bool:
    """Whether the system has no huge pages to give (none reserved, none on demand)."""
    counts = ("/proc/sys/vm/nr_hugepages", "/proc/sys/vm/nr_overcommit_hugepages")
    return all(Path(count).read_text().strip() == "0" for count in counts)


#: One huge page: the size of a hugetlbfs memfd (``_attach_unmappable``).
HUGE_PAGE = 2 * MIB
no_huge_pages = pytest.mark.skipif(not _no_huge_pages(), reason="huge pages are configured")


def _attach_unmappable(raw: socket.socket) -> None:
    """ATTACH a hugetlbfs memfd: sealed and of the size announced, it passes every check,
    and its mmap() fails where no huge page backs it."""
    fd = os.memfd_create("forged", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    os.ftruncate(fd, HUGE_PAGE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    _attach(raw, fd, HUGE_PAGE)


@no_huge_pages
def test_a_pool_that_cannot_be_mapped_is_refused(clean: None) -> None:
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        _attach_unmappable(forger.socket)
        _expect_closed_by(victim, "cannot be mapped here")


def test_attach_without_a_descriptor_and_slot_with_one(clean: None) -> None:
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        forger.socket.sendall(encode_record(ATTACH, PAGE))
        _expect_closed_by(victim, "1")
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        fd = _memfd(PAGE)
        fds = array.array("i", [fd]).tobytes()
        forger.socket.sendmsg(
            [encode_record(SLOT, 0, 1)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        )
        os.close(fd)
        _expect_closed_by(victim, "descriptors")


def test_a_release_of_a_slot_never_lent(clean: None) -> None:
    a, b = udskit.pair(shared_memory=True)
    with a, b:
        a.send(data(BIG))  # a's pool now exists and b holds offset 0
        b.socket.sendall(encode_record(RELEASE, PAGE))
        with pytest.raises(ProtocolError, match="not lent"):
            a.recv()


def test_a_release_of_a_loan_not_yet_sent(clean: None) -> None:
    """The peer never saw the loan: a RELEASE of it would let our next message be written
    over what the program is filling."""
    a, b = udskit.pair(shared_memory=True)
    with a, b:
        loan = a.loan(BIG)
        loan[:] = data(BIG)
        b.socket.sendall(encode_record(RELEASE, 0))
        with pytest.raises(ProtocolError, match="not lent"):
            a.send(data(BIG, seed=1))
        assert loan == data(BIG)
        loan.release()


# -- processes: fork, SIGKILL ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_fork_after_setup(clean: None, kind: str) -> None:
    a, b = udskit.pair(shared_memory=True, type=kind)  # type: ignore[call-overload]
    a.send(data(BIG, 1))  # both pools in place before the fork
    assert b.recv() == data(BIG, 1)
    b.send(data(BIG, 2))
    assert a.recv() == data(BIG, 2)
    pid = os.fork()
    if pid == 0:  # the child keeps b
        status = 1
        try:
            a.close()
            for _ in range(3, 8):
                message = b.recv()
                b.send(message[::-1])
            status = 0
        finally:
            os._exit(status)
    b.close()
    with a:
        for seed in range(3, 8):
            a.send(data(BIG, seed))
            with a.recv_view() as view:
                assert view == data(BIG, seed)[::-1]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_child_closing_its_copy_leaves_a_parent_thread_blocked_in_recv_working(
    clean: None, kind: str
) -> None:
    a, b = udskit.pair(shared_memory=True, type=kind)  # type: ignore[call-overload]
    with a, b:
        a.send(data(BIG, 1))  # both pools in place before the fork
        assert b.recv() == data(BIG, 1)
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(b.recv()), daemon=True)
        reader.start()
        for _ in range(10_000):  # bounded: until the reader holds the read lock
            if b._rlock.locked():
                break
            threading.Event().wait(0.001)
        pid = os.fork()
        if pid == 0:  # the child's copies of the parent's locks are held: not by it
            status = 1
            try:
                b.close()
                a.close()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a.send(data(BIG, 2))
        reader.join(WAIT)
        assert got == [data(BIG, 2)]


_CHILD = """
import sys, udskit
channel = udskit.connect(sys.argv[1], shared_memory=True)
assert channel.recv() == b"go" and channel.shared_memory   # the offer came first
channel.send(b"x" * {size})       # through the pool
view = channel.recv_view()        # hold the parent's message, never release it
channel.send(b"holding")
sys.stdin.read()                  # wait to be killed
"""


@pytest.mark.parametrize("hold", [True, False], ids=["view-released-first", "view-held"])
def test_a_peer_killed_mid_conversation_frees_everything(
    sockdir: Path, clean: None, hold: bool
) -> None:
    path = sockdir / "s"
    maps = pool_mappings()
    with udskit.listen(path, shared_memory=2 * MIB) as listener:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(size=BIG), str(path)],
            stdin=subprocess.PIPE,
        )
        try:
            with listener.accept() as channel:
                channel.settimeout(WAIT)
                channel.send(b"go")
                view = channel.recv_view()  # the child's message, in the child's pool
                assert pool_mappings() == maps + 1
                channel.send(data(BIG))  # held by the child, never released
                assert channel.recv() == b"holding"
                assert channel.pool_in_use == BIG
                os.kill(child.pid, signal.SIGKILL)
                child.wait(WAIT)
                # The dead sender's message stays readable: our mapping keeps its memory.
                assert view == b"x" * BIG
                if hold:
                    view.release()
                # Our pool stays full of what the dead peer held: the send ends, no hang.
                with pytest.raises(ConnectionClosed):  # noqa: PT012 - either send may see it
                    channel.send(data(BIG))
                    channel.send(data(BIG))
            assert pool_mappings() == (maps if hold else maps + 1)
            view.release()  # the last view gone: the dead peer's pool is unmapped too
            assert pool_mappings() == maps
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(WAIT)
            assert child.stdin is not None
            child.stdin.close()


def test_the_numpy_example(clean: None) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "shm_numpy.py"
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "shared memory in use: True",
        "sent with send(): sum is 499999500000.0",
        "sent with loan(): sum is 1000000.0",
        "child exited with 0",
    ]


def test_numpy_arrays_in_and_out(shm_pair: tuple[Channel, Channel]) -> None:
    np = pytest.importorskip("numpy")  # a test dependency; the library never imports it
    a, b = shm_pair
    matrix = np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024)
    a.send(matrix)
    with b.recv_view() as view:
        got = np.frombuffer(view, dtype=np.float32).reshape(512, 1024)
        assert not got.flags.writeable
    # The view is released, but the array made from it still reads the slot: it stays the
    # receiver's until the array is gone too.
    b.send(b"sync")
    assert a.recv() == b"sync"
    assert a.pool_in_use == matrix.nbytes
    assert (got == matrix).all()
    del got
    b.send(b"sync")
    assert a.recv() == b"sync"
    assert a.pool_in_use == 0
    with pytest.raises(TypeError, match="one contiguous block of memory"):
        a.send(matrix[:, ::2])  # not one block of memory: nothing is sent
    a.send(b"after")
    assert b.recv() == b"after"


# -- servers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_thread_per_client_server_with_shared_memory(
    sockdir: Path, clean: None, kind: str
) -> None:
    path = sockdir / "s"
    message = data(BIG, 8)

    def echo(channel: Channel) -> None:
        while True:
            try:
                view = channel.recv_view()
            except ConnectionClosed:
                return
            with view:
                channel.send(view)  # from the client's pool into ours: one copy

    with udskit.Server(path, echo, shared_memory=True, type=kind) as server:  # type: ignore[arg-type]
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            with udskit.connect(path, shared_memory=True, type=kind) as channel:  # type: ignore[arg-type]
                channel.send(b"hi")
                assert channel.recv() == b"hi"
                channel.send(message)
                assert channel.recv() == message
                assert channel.shared_memory
        finally:
            server.stop()
            thread.join(WAIT)


def test_message_servers_refuse_shared_memory(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="message server"):
        udskit.MessageServer(sockdir / "s", lambda conn, message: message, shared_memory=True)
    assert not (sockdir / "s").exists()


def test_a_channel_with_shared_memory_cannot_be_pickled(shm_pair: tuple[Channel, Channel]) -> None:
    a, _ = shm_pair
    with pytest.raises(ProtocolError) as caught:
        pickle.dumps(a)
    # It said what failed, not what to do instead.
    assert str(caught.value) == (
        "cannot hand over a channel with shared_memory: its pools belong to this process; "
        "make the channels before os.fork() (multiprocessing's 'fork' start method), or open "
        "the channel in the process that uses it (listen/connect there)"
    )


def test_a_sender_killed_between_its_pool_and_its_message(clean: None) -> None:
    """The peer attached its pool, wrote half a record of its message, and was SIGKILLed:
    recv() reports the connection cut mid-message, and closing frees the dead peer's pool."""
    victim, other = udskit.pair(shared_memory=True)
    maps = pool_mappings("forged")
    pid = os.fork()
    if pid == 0:  # the child: a sender that dies half-way
        try:
            victim.close()
            raw = other.socket
            _attach(raw, _memfd(PAGE * 64), PAGE * 64)
            raw.sendall(encode_record(SLOT, 0, 100)[:10])
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    other.close()
    with victim:
        with pytest.raises(ConnectionClosed) as cut:
            victim.recv()
        assert cut.value.mid_message
        assert pool_mappings("forged") == maps + 1  # its pool was mapped, until we close
    assert pool_mappings("forged") == maps
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)


def test_a_pool_larger_than_ours_is_refused(clean: None) -> None:
    """A sparse memfd of gigabytes costs the peer nothing, and what we keep per message held
    in it grows with its size: a peer's pool is at most ours (or the default)."""
    victim, forger = udskit.pair(shared_memory=True)
    with victim, forger:
        big = 2 * DEFAULT_POOL
        _attach(forger.socket, _memfd(big), big)
        _expect_closed_by(victim, f"pool of {big} bytes; this side takes at most {DEFAULT_POOL}")


def test_a_pool_arriving_after_close_is_not_mapped(clean: None) -> None:
    """A reader that outlives close() (which waits for it a bounded time), having checked
    the peer's ATTACH before close(), must not map the pool: nothing would unmap it."""
    shm = SharedMemory(DEFAULT_POOL, DEFAULT_POOL, peer_opted=True, where="test channel")
    shm.close()
    arrived = r"^test channel: the channel was closed while its peer's pool arrived"
    with pytest.raises(ConnectionClosed, match=arrived):
        shm.attach_peer(_memfd(PAGE * 16), PAGE * 16)
    assert pool_mappings("forged") == 0  # and the clean fixture: its descriptor closed
