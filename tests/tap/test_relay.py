"""What the relay passes: every byte, in order, unchanged; message boundaries; datagrams
and their replies; descriptors, intact and described; and never more than a bounded
amount held for a side that does not read."""

from __future__ import annotations

import array
import os
import random
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import tap
from udskit.options import tune_buffers
from udskit.tap.pump import READ_SIZE

from ..conftest import READY_TIMEOUT
from ..e2e.servers import require_peer
from .conftest import Recorder
from .servers import DatagramEcho, keep_fds, recv_exactly, server

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Tapping = Callable[..., tuple[tap.Tap, Recorder]]


def test_a_stream_passes_every_byte_in_order_both_ways(sockdir: Path, tapping: Tapping) -> None:
    """4 MiB of random bytes in writes of random sizes while the echo comes back: what
    returns is exactly what was sent, and the events hold the very same bytes."""
    path = sockdir / "app.sock"
    payload = random.Random(7).randbytes(4 * 1024 * 1024)
    with server(path):
        running, events = tapping(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            sizes = random.Random(8)

            def send() -> None:
                offset = 0
                while offset < len(payload):
                    step = sizes.randint(1, 300_000)
                    client.sendall(payload[offset : offset + step])
                    offset += step
                client.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            echoed = recv_exactly(client, len(payload))
            assert client.recv(1) == b""
            sender.join(READY_TIMEOUT)
        assert echoed == payload
        running.stop(grace=5.0)
    for direction in ("up", "down"):
        seen = b"".join(e.data for e in events.of(tap.Data) if e.direction == direction)
        assert seen == payload
    reasons = {e.direction: e.reason for e in events.of(tap.Closed) if e.direction}
    assert reasons == {"up": "end of stream", "down": "end of stream"}
    # every event of the connection was delivered by the time stop() returned
    assert [e.direction for e in events.of(tap.Closed)][-1] is None  # type: ignore[union-attr]


def test_seqpacket_messages_keep_their_boundaries(sockdir: Path, tapping: Tapping) -> None:
    path = sockdir / "packets.sock"
    # more messages above READ_SIZE than the relay has buffers (READS_HELD)
    sizes = [1, 5, 70_000, 3, 300_000, 17, 400_000, 300_000, 300_000, 300_000, 300_000, 9]
    messages = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    with server(path, kind="seqpacket"):
        running, events = tapping(path)
        assert running.type == "seqpacket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            client.connect(str(path))
            for message in messages:
                client.sendall(message)
                assert client.recv(1 << 20) == message
        # Events reach the handler off the relay's path: the last may follow its echo.
        events.wait_for(
            lambda seen: (
                sum(isinstance(e, tap.Data) and e.direction == "up" for e in seen) >= len(messages)
            )
        )
    ups = [e.data for e in events.of(tap.Data) if e.direction == "up"]
    assert ups == messages


def test_datagrams_reach_the_server_and_replies_their_sender(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path)
    try:
        running, events = tapping(path)
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound,
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound,
        ):
            bound.bind(str(sockdir / "client.sock"))
            bound.settimeout(READY_TIMEOUT)
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            big = b"b" * 300_000  # more than the relay's default send buffer holds
            for word in (b"one", big, b"two"):
                bound.sendto(word, str(path))
                assert bound.recv(1 << 20) == word.upper()
            unbound.sendto(b"from nowhere", str(path))
            events.wait_for(lambda evs: sum(isinstance(e, tap.Opened) for e in evs) == 2)
            srv.wait_seen(4)
        running.stop(grace=5.0)
    finally:
        srv.close()
    received = [data for data, _, _ in srv.seen]
    assert received == [b"one", big, b"two", b"from nowhere"]
    opened = events.of(tap.Opened)
    assert opened[0].address == str(sockdir / "client.sock")  # type: ignore[union-attr]
    assert opened[1].address == ""  # type: ignore[union-attr]  # unbound: shown as such
    downs = [e.data for e in events.of(tap.Data) if e.direction == "down"]
    assert downs == [b"ONE", big.upper(), b"TWO"]


def test_unbound_senders_of_two_processes_are_two_conversations(
    sockdir: Path, tapping: Tapping
) -> None:
    """A sender that never bound arrives without an address: socat's UNIX-SENDTO and then
    ours are told apart by their pid, each opened once with its own number."""
    require_peer("socat", shutil.which("socat") is not None)
    path = sockdir / "log.sock"
    srv = DatagramEcho(path)
    try:
        running, events = tapping(path)
        subprocess.run(
            ["socat", "-u", "-", f"UNIX-SENDTO:{path}"],
            input=b"from socat",
            check=True,
            timeout=READY_TIMEOUT,
        )
        events.wait_for(lambda evs: any(isinstance(e, tap.Opened) for e in evs))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
            unbound.sendto(b"from us", str(path))
            unbound.sendto(b"from us again", str(path))
            srv.wait_seen(3)
        running.stop(grace=5.0)
    finally:
        srv.close()
    assert [data for data, _, _ in srv.seen] == [b"from socat", b"from us", b"from us again"]
    opened = [e for e in events.of(tap.Opened) if isinstance(e, tap.Opened)]
    assert [e.conn for e in opened] == [1, 2]
    pids = [e.client.pid if e.client is not None else None for e in opened]
    assert pids[1] == os.getpid()
    assert pids[0] not in (None, os.getpid())
    ups = [(e.conn, e.data) for e in events.of(tap.Data) if e.direction == "up"]
    assert ups == [(1, b"from socat"), (2, b"from us"), (2, b"from us again")]


def test_descriptors_pass_intact_and_are_described(sockdir: Path, tapping: Tapping) -> None:
    path = sockdir / "fds.sock"
    kept: list[list[int]] = []
    memfd = os.memfd_create("frame")
    os.write(memfd, b"x" * 12 * 1024)
    read_end, write_end = os.pipe()
    try:
        with server(path, keep_fds(kept)):
            running, events = tapping(path)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendmsg(
                    [b"frame"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd, write_end]))],
                )
                assert client.recv(100) == b"2 frame"
            running.stop(grace=5.0)
        # the tap's liveness probes are connections that send nothing: skip them
        (passed,) = [fds for fds in kept if fds]
        passed_memfd, passed_pipe = passed
        try:
            assert os.pread(passed_memfd, 5, 0) == b"xxxxx"
            os.write(passed_pipe, b"!")
            assert os.read(read_end, 1) == b"!"
        finally:
            os.close(passed_memfd)
            os.close(passed_pipe)
    finally:
        for fd in (memfd, read_end, write_end):
            os.close(fd)
    (data,) = [e for e in events.of(tap.Data) if e.direction == "up"]
    assert [(f.kind, f.name, f.size) for f in data.fds] == [  # type: ignore[union-attr]
        ("memfd", "memfd:frame", 12 * 1024),
        ("pipe", "pipe", None),
    ]
    assert str(data.fds[0]).endswith(": memfd:frame (12 KiB)")  # type: ignore[union-attr]


def test_descriptors_glued_behind_other_bytes_reach_the_message_they_came_with(
    sockdir: Path, tapping: Tapping
) -> None:
    """The relay stalls (the server reads nothing yet) while the client queues a message
    and then one with a descriptor behind it: the relay's next read holds both, and the
    kernel's descriptors of the second. Passed on with the read's first byte they would
    reach the udskit server with the first message; they must come with the second."""
    path = sockdir / "fds.sock"
    with socket.socket(socket.AF_UNIX) as probe:
        tune_buffers(probe, None, None)
        relay_buffer = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # What the relay takes before it stalls (its socket's buffer and one read), and 100 KiB
    # more that wait in the client's socket, then the two messages behind them.
    first = b"f" * (relay_buffer + READ_SIZE + 100 * 1024)
    second = b"s" * (64 * 1024)
    read_end, write_end = os.pipe()
    queued = threading.Event()
    failures: list[BaseException] = []
    with udskit.listen(path, max_frame=len(first)) as listener:
        tapping(path)
        with udskit.connect(path, max_frame=len(first), timeout=READY_TIMEOUT) as client:

            def send() -> None:
                try:
                    client.send(first)
                    client.send(second)
                    client.send_fds(b"third", [write_end])
                    queued.set()
                except BaseException as exc:  # reported by the test's thread
                    failures.append(exc)
                    queued.set()

            sender = threading.Thread(target=send)
            sender.start()
            conn = _first_client(listener)
            with conn:
                assert queued.wait(READY_TIMEOUT), "the client's messages never got queued"
                assert not failures, failures
                got = [conn.recv_fds() for _ in range(3)]
            sender.join(READY_TIMEOUT)
    try:
        assert [(data[:1], len(data)) for data, _ in got] == [
            (b"f", len(first)),
            (b"s", len(second)),
            (b"t", 5),
        ]
        assert [len(fds) for _, fds in got] == [0, 0, 1]
        (passed,) = got[2][1]
        os.write(passed, b"!")
        assert os.read(read_end, 1) == b"!"
    finally:
        for _, fds in got:
            for fd in fds:
                os.close(fd)
        os.close(read_end)
        os.close(write_end)


def _first_client(listener: udskit.Listener) -> udskit.Channel:
    """The first accepted connection that sends something (the tap's own probes, which
    connect and close, come first), read nothing of."""
    for _ in range(10):
        conn = listener.accept()
        readable = select.poll()
        readable.register(conn.fileno(), select.POLLIN)
        assert readable.poll(READY_TIMEOUT * 1000), "a connection neither sent nor closed"
        # A duplicate shares the socket's flags: no settimeout(), which would make the
        # channel's socket non-blocking too.
        with socket.socket(fileno=os.dup(conn.fileno())) as peek:
            if peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return conn
        conn.close()
    raise AssertionError("no client among the first ten connections")


def test_253_descriptors_in_one_message_all_arrive(sockdir: Path, tapping: Tapping) -> None:
    path = sockdir / "many.sock"
    kept: list[list[int]] = []
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(253)]
    try:
        with server(path, keep_fds(kept)):
            running, events = tapping(path)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendmsg(
                    [b"m"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
                assert client.recv(100) == b"253 m"
            running.stop(grace=5.0)
    finally:
        for fd in fds:
            os.close(fd)
        for received in kept:
            for fd in received:
                os.close(fd)
    assert [len(fds) for fds in kept if fds] == [253]
    (data,) = [e for e in events.of(tap.Data) if e.direction == "up"]
    assert {f.name for f in data.fds} == {"/dev/null"}  # type: ignore[union-attr]


def _bytes_taken_until_blocked(path: Path) -> int:
    """Connect to a server that never reads and write until the write would block."""
    chunk = b"z" * 65536
    taken = 0
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.setblocking(False)
        for _ in range(100_000):
            try:
                taken += client.send(chunk)
            except BlockingIOError:
                # the relay may still be moving a read along: look again once, briefly
                client.settimeout(0.5)
                try:
                    taken += client.send(chunk)
                except (BlockingIOError, TimeoutError):
                    return taken
                client.setblocking(False)
    raise AssertionError("the writes never blocked")


def test_a_side_that_does_not_read_stops_the_other_within_a_bound(
    sockdir: Path, tapping: Tapping
) -> None:
    """Backpressure: through the tap a writer to a server that never reads is stopped after
    what the kernel's buffers hold plus at most one read of the relay (READ_SIZE).

    On a Unix stream socket what waits in the receiver's queue counts against the sender's
    SO_SNDBUF: the writer's own buffer, then the relay's socket to the server (udskit's
    stream buffer size, as the kernel grants it)."""
    path = sockdir / "slow.sock"
    never = threading.Event()
    with server(path, lambda conn: never.wait(READY_TIMEOUT)):
        direct = _bytes_taken_until_blocked(path)
        tapping(path)
        tapped = _bytes_taken_until_blocked(path)
        never.set()
    with socket.socket(socket.AF_UNIX) as probe:
        tune_buffers(probe, None, None)
        relay_buffer = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # The relay adds its socket's buffer towards the server and one read.
    assert direct < tapped <= direct + relay_buffer + READ_SIZE + 65536


def test_bytes_that_break_the_framing_are_relayed_unchanged(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "app.sock"
    malformed = b"\x00\x00\x00\x05abc" + b"\xff\xff\xff\xffrest" + b"GET / HTTP/9\r\n\r\n"
    with server(path):
        running, events = tapping(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.sendall(malformed)
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(client, len(malformed)) == malformed
        running.stop(grace=5.0)
    printed: list[bytes] = []
    printer = tap.Printer(printed.append, start=0.0, framing="length")
    for event in events.events:
        printer(event)
    text = b"".join(printed).decode()
    assert "5 B  length 61 62 63 ff ff" in text  # the first frame, whole
    assert "(not a length frame: a prefix announcing 4294931045 B" in text
    assert "shown raw from here" in text
