"""Shared memory on seqpacket channels: tagged packets once both ends switched, the hello
that switches them, and every fault of the stream path that applies to packets.

Faults come from a scripted peer: the far end of a pair (or a raw socket), written to with
hand-made packets and descriptors.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import Channel, ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.options import DEFAULT_MAX_FRAME, DEFAULT_MAX_MESSAGE
from udskit.proto.shm import (
    ATTACH,
    OFFER,
    PAGE,
    RELEASE,
    SHARED_THRESHOLD,
    SLOT,
    VERSION,
    encode_packet,
    hello_packet,
)

from .test_shared_memory import (
    BIG,
    MIB,
    WAIT,
    _expect_closed_by,
    _memfd,
    _pipe_end,
    clean,  # noqa: F401 - the fixture
    data,
    pool_mappings,
)

pytestmark = pytest.mark.usefixtures("clean")  # no descriptor or mapping left behind

SEQ = socket.SOCK_SEQPACKET
#: A message a seqpacket socket carries with default buffers (about 208 KiB).
PACKET = 64 * 1024


def _records(*records: tuple[int, int, int]) -> bytes:
    return b"\x01" + encode_packet(list(records))


def _rights(*fds: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _attach(raw: socket.socket, fd: int, size: int, *more: tuple[int, int, int]) -> None:
    raw.sendmsg([_records((ATTACH, size, 0), *more)], _rights(fd))
    os.close(fd)


def _seq_pair(**options: object) -> tuple[Channel, Channel]:
    options.setdefault("shared_memory", True)
    return udskit.pair(type="seqpacket", **options)  # type: ignore[arg-type]


# -- the path itself ----------------------------------------------------------------------------


def test_seqpacket_pair_moves_large_messages_through_the_pool() -> None:
    a, b = _seq_pair()
    with a, b:
        assert a.shared_memory
        assert b.shared_memory
        sizes = [1, 5, PACKET, BIG, 3, 2 * BIG, 7]
        for seed, size in enumerate(sizes):
            a.send(data(size, seed))
        assert a.pool_in_use == 3 * BIG  # lent until b is done with them
        assert [b.recv() for _ in sizes[:3]] == [data(s, i) for i, s in enumerate(sizes[:3])]
        view = b.recv_view()
        assert view.readonly
        assert view == data(BIG, 3)
        with pytest.raises(TypeError):
            view[0] = 1  # type: ignore[index]
        assert b.recv() == data(3, 4)
        # Boundaries exact, in order; recv_many() returns a packet at a time, as on any
        # seqpacket channel.
        assert b.recv_many() == [data(2 * BIG, 5)]
        assert b.recv_many() == [data(7, 6)]
        view.release()
        b.send(b"sync")  # b's releases precede this on the wire
        assert a.recv() == b"sync"
        assert a.pool_in_use == 0
        loan = a.loan(BIG)
        loan[:4] = b"loan"
        a.send(loan)
        with pytest.raises(ValueError, match="released"):
            loan[0] = 1
        with b.recv_view() as got:
            assert bytes(got[:4]) == b"loan"


def test_seqpacket_keeps_its_rules_with_shared_memory() -> None:
    a, b = _seq_pair()
    with a, b:
        with pytest.raises(ProtocolError, match="empty seqpacket"):
            a.send(b"")
        read, write = os.pipe()
        try:
            a.send_fds(b"with a descriptor", [write])
            message, fds = b.recv_fds()
            assert message == b"with a descriptor"
            assert len(fds) == 1
            os.write(fds[0], b"!")
            os.close(fds[0])
            assert os.read(read, 1) == b"!"
        finally:
            os.close(read)
            os.close(write)
        # Large messages go through the pool up to max_frame (the stream's default here):
        # what the pool cannot hold goes through the socket, which refuses a packet that
        # large, as on any seqpacket channel.
        with pytest.raises(FrameTooLarge):
            a.send(bytes(DEFAULT_MAX_FRAME + 1))
        a.send(b"still fine")
        assert b.recv() == b"still fine"
    plain_a, plain_b = udskit.pair(type="seqpacket")
    with plain_a, plain_b, pytest.raises(FrameTooLarge):  # no pool: the socket's packet size
        plain_a.send(data(BIG))
    assert DEFAULT_MAX_MESSAGE < BIG < DEFAULT_MAX_FRAME


#: The socket's own words for a packet it cannot take.
EMSGSIZE_WORDS = (
    "message is larger than the socket's send buffer allows (EMSGSIZE): send smaller "
    "messages, raise sndbuf, or use type='stream' for large payloads"
)


def test_a_message_the_pool_cannot_take_says_why() -> None:
    # It said only the socket's words, whose advice (type='stream') does not fit a channel
    # with shared memory: the message was over max_frame, or over the pool.
    a, b = udskit.pair(type="seqpacket", shared_memory=True)
    with a, b, pytest.raises(FrameTooLarge) as over_frame:
        a.send(bytes(DEFAULT_MAX_FRAME + 1))
    assert str(over_frame.value) == (
        f"{EMSGSIZE_WORDS}; the shared-memory pool takes no message over max_frame "
        f"({DEFAULT_MAX_FRAME} bytes), so this one of {DEFAULT_MAX_FRAME + 1} went through "
        "the socket: raise max_frame on both ends"
    )
    a, b = udskit.pair(type="seqpacket", shared_memory=BIG)
    with a, b, pytest.raises(FrameTooLarge) as over_pool:
        a.send(bytes(2 * BIG))
    assert str(over_pool.value) == (
        f"{EMSGSIZE_WORDS}; our shared-memory pool holds {BIG} bytes, so this message of "
        f"{2 * BIG} went through the socket: give shared_memory= a pool that holds it"
    )


def test_a_receiver_that_never_releases_gets_backpressure() -> None:
    a, b = _seq_pair(shared_memory=2 * MIB)
    with a, b:
        a.send(data(BIG))
        a.send(data(BIG))
        held = [b.recv_view(), b.recv_view()]
        a.settimeout(0.05)
        with pytest.raises(Timeout, match="pool stayed full"):
            a.send(data(BIG))
        assert a.pool_in_use == 2 * MIB
        a.settimeout(None)
        sender = threading.Thread(target=a.send, args=(data(BIG, 9),))
        sender.start()
        held.pop().release()  # from this thread while the sender waits: it completes
        sender.join(WAIT)
        assert not sender.is_alive()
        assert b.recv() == data(BIG, 9)
        held.pop().release()


# -- agreeing on connect ------------------------------------------------------------------------


def _serve_one(listener: udskit.Listener) -> threading.Thread:
    def run() -> None:
        with listener.accept() as channel:
            channel.send(b"greeting")
            for message in channel:
                channel.send(message)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(("client", "server"), [(True, True), (True, False), (False, True)])
def test_listen_and_connect_agree(sockdir: Path, client: bool, server: bool) -> None:
    path = sockdir / "s"
    with udskit.listen(path, type="seqpacket", shared_memory=server) as listener:
        thread = _serve_one(listener)
        with udskit.connect(path, type="seqpacket", shared_memory=client) as channel:
            assert channel.recv() == b"greeting"  # after the listener's hello, if any
            assert channel.shared_memory is (client and server)
            # Through the pool both ways when both opted in; else a packet-sized message.
            message = data(BIG if client and server else PACKET, 5)
            for _ in range(3):
                channel.send(message)
                assert channel.recv() == message
            channel.send(b"small")
            assert channel.recv() == b"small"
            assert channel.pool_in_use in (0, BIG)
        thread.join(WAIT)
        assert not thread.is_alive()


def test_a_client_that_sends_and_leaves_without_reading(sockdir: Path) -> None:
    """The listener's hello stays unread in the client, so the kernel reports a reset
    before the client's packets: the listener reads them all, then the end."""
    path = sockdir / "s"
    with udskit.listen(path, type="seqpacket", shared_memory=True) as listener:
        with udskit.connect(path, type="seqpacket", shared_memory=True) as client:
            server = listener.accept()
            for message in (b"one", b"two", b"three"):
                client.send(message)
        with server:
            assert list(server) == [b"one", b"two", b"three"]


def test_a_server_that_did_not_opt_in_sees_plain_packets(sockdir: Path) -> None:
    path = str(sockdir / "plain")
    with socket.socket(socket.AF_UNIX, SEQ) as server:
        server.bind(path)
        server.listen()
        with udskit.connect(path, type="seqpacket", shared_memory=True) as channel:
            conn, address = server.accept()
            with conn:
                assert address.startswith(b"\0udskit-shm/")  # the opt-in: a name, no byte
                channel.send(b"hello")
                channel.send(data(PACKET))
                assert conn.recv(PACKET + 1) == b"hello"  # no tag, no record
                assert conn.recv(PACKET + 1) == data(PACKET)
                # A packet shaped like a hello, without this connection's marker, is a
                # message; and after the first packet nothing switches any more.
                fake = hello_packet(b"\0udskit-shm/" + b"0" * 16)
                conn.send(fake)
                conn.send(hello_packet(address))
                assert channel.recv() == fake
                assert channel.recv() == hello_packet(address)
                assert not channel.shared_memory
                channel.send(data(200_000))  # above the threshold: through the socket
                assert conn.recv(MIB) == data(200_000)


def test_a_client_that_did_not_opt_in_gets_no_hello(sockdir: Path) -> None:
    path = str(sockdir / "s")
    with (
        udskit.listen(path, type="seqpacket", shared_memory=True) as listener,
        socket.socket(socket.AF_UNIX, SEQ) as raw,
    ):
        raw.connect(path)
        with listener.accept() as channel:
            assert not channel.shared_memory
            channel.send(b"hi")
            raw.send(_records((SLOT, 0, PAGE)))  # what a forger sends is a message here
            assert channel.recv() == _records((SLOT, 0, PAGE))
            channel.send(data(200_000))
            channel.close()
            assert raw.recv(MIB) == b"hi"
            assert raw.recv(MIB) == data(200_000)
            assert raw.recv(MIB) == b""


def test_the_one_message_a_client_cannot_send_before_the_listener_answers(sockdir: Path) -> None:
    path = str(sockdir / "plain")
    with socket.socket(socket.AF_UNIX, SEQ) as server:
        server.bind(path)
        server.listen()
        with udskit.connect(path, type="seqpacket", shared_memory=True) as channel:
            conn, address = server.accept()
            with conn:
                with pytest.raises(ProtocolError, match="hello"):
                    channel.send(hello_packet(address))  # nothing sent
                conn.send(b"first")  # the listener did not opt in: nothing is ambiguous
                assert channel.recv() == b"first"
                channel.send(hello_packet(address))
                assert conn.recv(100) == hello_packet(address)


def test_a_pool_record_on_a_channel_that_did_not_opt_in() -> None:
    a, b = udskit.pair(type="seqpacket")
    with a, b:
        fd = _memfd(PAGE * 16)
        b.socket.sendmsg([_records((ATTACH, PAGE * 16, 0))], _rights(fd))
        os.close(fd)
        message, fds = a.recv_fds()  # bytes and a descriptor, as sent: nothing mapped
        assert message == _records((ATTACH, PAGE * 16, 0))
        assert len(fds) == 1
        os.close(fds[0])
        assert not a.shared_memory


# -- a peer that misbehaves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packets", "match"),
    [
        ([_records((SLOT, 0, 100))], "before its pool"),
        (["attach", _records((SLOT, PAGE * 64, 100))], "outside its pool"),
        (["attach", _records((SLOT, 1, 100))], "outside its pool"),
        (["attach", _records((SLOT, 0, DEFAULT_MAX_FRAME + 1))], "max_frame"),
        (["attach", _records((SLOT, 0, 0))], "message of 0 bytes"),
        (["attach", _records((SLOT, 0, 100), (SLOT, 0, 100))], "overlaps"),
        (["attach", "attach"], "second"),
        ([_records((RELEASE, 0, 0))], "never sent"),
        ([_records((OFFER, VERSION, 0))], "only a listener"),
        ([b"\x01\x09" + bytes(16)], "unknown"),
        ([b"\x01" + bytes(5)], "records packet of 5 bytes"),
        ([b"\x01"], "records packet of 0 bytes"),
        ([b"\x00"], "empty tagged message"),
        ([b"\x07hello"], "unknown shared-memory tag 7"),
        ([hello_packet(b"\0udskit-shm/" + b"0" * 16)], "unknown shared-memory tag 255"),
    ],
    ids=[
        "slot-first",
        "slot-outside",
        "slot-misaligned",
        "slot-over-max-frame",
        "slot-empty",
        "slot-overlap",
        "second-attach",
        "release-unlent",
        "offer",
        "unknown-kind",
        "short-record",
        "no-record",
        "empty-message",
        "unknown-tag",
        "hello-when-tagged",
    ],
)
def test_forged_packets_close_the_channel(packets: list[bytes | str], match: str) -> None:
    victim, forger = _seq_pair()
    with victim, forger:
        raw = forger.socket
        for packet in packets:
            if packet == "attach":
                _attach(raw, _memfd(PAGE * 64), PAGE * 64)
            else:
                raw.send(packet)  # type: ignore[arg-type]
        _expect_closed_by(victim, match)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _memfd(PAGE * 16, seals=0), "not sealed"),
        (lambda: _memfd(PAGE * 16, seals=fcntl.F_SEAL_GROW), "not sealed"),
        (lambda: os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC), "not a memfd"),
        (_pipe_end, "not a memfd"),
        (lambda: _memfd(PAGE * 8), "not the"),
    ],
    ids=["unsealed", "shrinkable", "regular-file", "pipe", "wrong-size"],
)
def test_bad_pool_descriptors_are_refused(make: Callable[[], int], match: str) -> None:
    victim, forger = _seq_pair()
    with victim, forger:
        _attach(forger.socket, make(), PAGE * 16, (SLOT, 0, 100))
        _expect_closed_by(victim, match)


def test_descriptors_where_none_belong() -> None:
    victim, forger = _seq_pair()
    with victim, forger:
        forger.socket.send(_records((ATTACH, PAGE, 0)))
        _expect_closed_by(victim, "1")
    victim, forger = _seq_pair()
    with victim, forger:
        first, second = _memfd(PAGE), _memfd(PAGE)
        forger.socket.sendmsg([_records((ATTACH, PAGE, 0))], _rights(first, second))
        os.close(first)
        os.close(second)
        _expect_closed_by(victim, "2 descriptors")
    victim, forger = _seq_pair()
    with victim, forger:
        fd = _memfd(PAGE)
        forger.socket.sendmsg([_records((SLOT, 0, 1), (ATTACH, PAGE, 0))], _rights(fd))
        os.close(fd)
        _expect_closed_by(victim, "descriptors")


def test_a_hello_with_descriptors_or_another_version(sockdir: Path) -> None:
    path = str(sockdir / "forged")
    for extra, match in (({"fd": True}, "hello came with descriptors"), ({}, "version 9")):
        with socket.socket(socket.AF_UNIX, SEQ) as server:
            server.bind(path)
            server.listen()
            with udskit.connect(path, type="seqpacket", shared_memory=True) as channel:
                conn, address = server.accept()
                with conn:
                    if extra:
                        fd = _memfd(PAGE)
                        conn.sendmsg([hello_packet(address)], _rights(fd))
                        os.close(fd)
                    else:
                        conn.send(hello_packet(address, version=9))
                    _expect_closed_by(channel, match)
        os.unlink(path)


# -- processes: SIGKILL -------------------------------------------------------------------------


_CHILD = """
import sys, udskit
channel = udskit.connect(sys.argv[1], type="seqpacket", shared_memory=True)
assert channel.recv() == b"go" and channel.shared_memory   # the hello came first
channel.send(b"x" * {size})       # through the pool
view = channel.recv_view()        # hold the parent's message, never release it
channel.send(b"holding")
sys.stdin.read()                  # wait to be killed
"""


def test_a_peer_killed_mid_conversation_frees_everything(sockdir: Path) -> None:
    path = sockdir / "s"
    maps = pool_mappings()
    with udskit.listen(path, type="seqpacket", shared_memory=2 * MIB) as listener:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(size=BIG), str(path)], stdin=subprocess.PIPE
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
                assert view == b"x" * BIG  # our mapping keeps the dead sender's memory
                with pytest.raises(ConnectionClosed):  # noqa: PT012 - either send may see it
                    channel.send(data(BIG))
                    channel.send(data(BIG))
            assert pool_mappings() == maps + 1  # the view still holds the peer's pool
            view.release()
            assert pool_mappings() == maps
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(WAIT)
            assert child.stdin is not None
            child.stdin.close()


def test_a_sender_killed_after_its_pool_before_its_message() -> None:
    victim, other = _seq_pair()
    maps = pool_mappings("forged")
    pid = os.fork()
    if pid == 0:  # the child: attaches a pool, then dies before any message
        try:
            victim.close()
            _attach(other.socket, _memfd(PAGE * 64), PAGE * 64)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    other.close()
    with victim:
        with pytest.raises(ConnectionClosed) as cut:
            victim.recv()
        assert not cut.value.mid_message  # a packet is whole or absent: nothing cut
        assert pool_mappings("forged") == maps + 1  # its pool was mapped, until we close
    assert pool_mappings("forged") == maps
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)


def test_a_lost_message_costs_that_message_a_lost_record_the_channel() -> None:
    victim, forger = _seq_pair(max_frame=1000, max_fds=1)  # a buffer of 1,088 bytes
    with victim, forger:
        raw = forger.socket
        fds = [_memfd(PAGE), _memfd(PAGE)]
        raw.send(b"\x00" + bytes(2000))  # truncated
        raw.send(b"\x00ok")
        raw.sendmsg([b"\x00two descriptors"], _rights(*fds))  # one more than max_fds
        raw.send(b"\x00after")
        raw.send(b"\x01" + bytes(17 * 100))  # a records packet cut short
        for fd in fds:
            os.close(fd)
        with pytest.raises(ProtocolError, match="truncated"):
            victim.recv()
        assert victim.recv() == b"ok"
        with pytest.raises(ProtocolError, match="max_fds"):
            victim.recv()
        assert victim.recv() == b"after"
        _expect_closed_by(victim, "truncated")


def test_a_message_lost_while_a_sender_looks_for_releases_is_reported_to_recv() -> None:
    a, b = _seq_pair(shared_memory=SHARED_THRESHOLD, max_fds=1)
    with a, b:
        a.send(data(SHARED_THRESHOLD))
        held = b.recv_view()  # a's pool is full until b releases this
        fds = [_memfd(PAGE), _memfd(PAGE)]
        b.socket.sendmsg([b"\x00two descriptors"], _rights(*fds))
        b.socket.send(b"\x00next")
        for fd in fds:
            os.close(fd)
        a.settimeout(0.1)
        with pytest.raises(Timeout, match="pool stayed full"):  # it read both meanwhile
            a.send(data(SHARED_THRESHOLD))
        with pytest.raises(ProtocolError, match="max_fds"):
            a.recv()
        assert a.recv() == b"next"
        held.release()


def test_descriptors_read_ahead_are_closed_when_a_record_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed_twice: list[int] = []
    real_close = os.close

    def close(fd: int) -> None:  # a second close of a number another thread may own now
        try:
            real_close(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                closed_twice.append(fd)
            raise

    a, b = _seq_pair(shared_memory=SHARED_THRESHOLD)
    with a, b:
        a.send(data(SHARED_THRESHOLD))
        held = b.recv_view()  # a's pool is full: a's next send reads ahead for releases
        read, write = os.pipe()
        b.socket.sendmsg([b"\x00with a descriptor"], _rights(read))
        b.socket.send(_records((SLOT, 0, 100)))  # no pool of b's yet: refused
        os.close(read)
        os.close(write)
        a.settimeout(WAIT)
        with monkeypatch.context() as patched:
            patched.setattr(os, "close", close)
            with pytest.raises(ProtocolError, match="before its pool"):
                a.send(data(SHARED_THRESHOLD))
        assert closed_twice == []
        held.release()
    # The clean fixture: the descriptor of the message read ahead was closed with it.


#: Tiny messages a peer sends while our sender waits for pool space: more than the read
#: ahead may hold (ARRIVED_MAX counts each at least ARRIVAL_COST bytes: 16,384 of them).
FLOOD = 40_000


def test_read_ahead_is_bounded_for_tiny_messages_too() -> None:
    a, b = _seq_pair(shared_memory=SHARED_THRESHOLD)
    with a, b:
        a.send(data(SHARED_THRESHOLD))
        held = b.recv_view()
        raw = b.socket
        raw.settimeout(WAIT)
        sent = 0

        def flood() -> None:
            nonlocal sent
            try:
                for _ in range(FLOOD):
                    raw.send(b"\x00x")
                    sent += 1
            except OSError:
                pass  # a closed: the end of the test

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            a.settimeout(1.0)
            with pytest.raises(Timeout, match="pool stayed full"):
                a.send(data(SHARED_THRESHOLD))
            assert sent < FLOOD  # a stopped reading ahead: the rest waits in the peer
        finally:
            a.close()
            thread.join(WAIT)
        held.release()


def test_a_channel_takes_memory_for_the_packets_it_reads_not_for_max_frame() -> None:
    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    pairs = [_seq_pair() for _ in range(4)]
    try:
        for a, b in pairs:
            a.send(b"ping")
            assert b.recv() == b"ping"
            b.send(b"pong")
            assert a.recv() == b"pong"
        # Eight channels whose buffers each hold a 16 MiB packet: 128 MiB if allocated.
        assert resident() - before < 16 * MIB
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_send_many_takes_large_messages_through_the_pool() -> None:
    a, b = _seq_pair()
    with a, b:
        a.send_many([b"small", data(BIG, 1), b"last"])  # 1 MiB: no socket packet that large
        assert a.pool_in_use == BIG
        assert b.recv() == b"small"
        assert b.recv() == data(BIG, 1)
        assert b.recv() == b"last"


def test_a_lost_first_packet_means_the_listener_did_not_opt_in(sockdir: Path) -> None:
    path = str(sockdir / "plain")
    with socket.socket(socket.AF_UNIX, SEQ) as server:
        server.bind(path)
        server.listen()
        with udskit.connect(path, type="seqpacket", shared_memory=True, max_fds=1) as channel:
            channel.settimeout(WAIT)
            conn, address = server.accept()
            with conn:
                fds = [_memfd(PAGE), _memfd(PAGE)]
                conn.sendmsg([b"two descriptors"], _rights(*fds))
                for fd in fds:
                    os.close(fd)
                conn.send(hello_packet(address))  # after the first packet: a message
                with pytest.raises(ProtocolError, match="max_fds"):
                    channel.recv()
                assert channel.recv() == hello_packet(address)
                assert not channel.shared_memory
                channel.send(b"plain")
                assert conn.recv(100) == b"plain"


def test_a_large_message_the_socket_refuses_says_why_the_pool_was_not_used(
    sockdir: Path,
) -> None:
    path = str(sockdir / "plain")
    with socket.socket(socket.AF_UNIX, SEQ) as server:
        server.bind(path)
        server.listen()
        with udskit.connect(path, type="seqpacket", shared_memory=True) as channel:
            conn, _ = server.accept()
            with conn:
                with pytest.raises(FrameTooLarge, match="must receive the listener's first"):
                    channel.send(data(BIG))
                conn.send(b"first")
                assert channel.recv() == b"first"
                with pytest.raises(FrameTooLarge, match="listener did not opt in"):
                    channel.send(data(BIG))
