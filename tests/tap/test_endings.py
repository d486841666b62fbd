"""How relayed connections end, and how the tap stops while its handler runs: a side that
stops reading still gets the other's last bytes, a cut reaches a connection still being
connected, and restore() called at once from the handler and from another thread."""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from udskit import tap
from udskit.tap import pump, relay

from ..conftest import READY_TIMEOUT
from .conftest import Recorder
from .servers import TYPES, DatagramEcho, recv_exactly, server

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Tapping = Callable[..., tuple[tap.Tap, Recorder]]


def _read_to_end(sock: socket.socket) -> list[bytes]:
    """Every read (every message, on seqpacket) until the end of stream."""
    reads = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return reads
        reads.append(chunk)


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_a_server_that_stops_reading_still_sends_its_whole_reply(
    sockdir: Path, tapping: Tapping, kind: str
) -> None:
    """The server shuts down reading, then replies with more than every buffer on the way
    holds; the client writes once more meanwhile (that write fails at the server, as it
    would without the tap). The reply still arrives whole, then the end of stream."""
    path = sockdir / "app.sock"
    reply = [bytes([n]) * 65536 for n in range(64)]  # 4 MiB
    shut = threading.Event()
    sent: list[bool] = []

    def handle(conn: socket.socket) -> None:
        if conn.recv(7, socket.MSG_WAITALL) != b"request":
            return  # the tap's own probe
        conn.shutdown(socket.SHUT_RD)
        shut.set()
        for message in reply:
            conn.sendall(message)
        sent.append(True)

    with server(path, handle, kind=kind):
        running, events = tapping(path)
        with socket.socket(socket.AF_UNIX, TYPES[kind]) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"request")
            assert shut.wait(READY_TIMEOUT)
            client.sendall(b"more")  # taken by the relay; the server no longer reads
            got = _read_to_end(client)
        if kind == "seqpacket":
            assert got == reply  # every message, whole
        assert b"".join(got) == b"".join(reply)
        running.stop(grace=5.0)
    assert sent == [True]
    down = [e.data for e in events.of(tap.Data) if e.direction == "down"]
    assert b"".join(down) == b"".join(reply)


def test_a_cut_reaches_a_connection_still_waiting_for_the_servers_backlog(
    sockdir: Path, tapping: Tapping
) -> None:
    """cut() while the relay still waits to connect (the server's backlog is full): the
    connection ends, and does not reach the server later when its backlog has room (where
    it would stay open with a server that waits for its client)."""
    path = sockdir / "app.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        while True:  # fill the server's backlog
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            queued.append(filler)
            if filler.connect_ex(str(path)) != 0:
                break
            assert len(queued) < 64
        running, events = tapping(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            events.wait_for(lambda seen: any(isinstance(e, tap.Opened) for e in seen))
            running.cut()
            listener.settimeout(READY_TIMEOUT)
            # Room again: a connect still retried would get in now.
            accepted.extend(listener.accept()[0] for _ in queued[1:])
            assert running.drain(5.0), "a cut connection was still relayed"
            assert client.recv(1) == b""
        closed = [e for e in events.of(tap.Closed) if e.direction is None]
        assert len(closed) == 1
        refused = events.of(tap.Refused)
        assert [e.reason for e in refused] == ["cut before the server accepted it"]
    finally:
        for sock in queued + accepted:
            sock.close()
        listener.close()


def test_restore_from_the_handler_and_from_another_thread_at_once(sockdir: Path) -> None:
    """The handler calls restore() while another thread is inside restore(): both return
    (neither waits for the other while holding what the other needs)."""
    path = sockdir / "app.sock"
    in_handler = threading.Event()
    said: list[str] = []
    running: tap.Tap | None = None

    def handler(event: tap.Event) -> None:
        if isinstance(event, tap.Data) and running is not None and not in_handler.is_set():
            in_handler.set()
            deadline = threading.Event()
            for _ in range(int(READY_TIMEOUT * 1000)):  # until the other restore() moved it
                if path.stat().st_ino == srv.inode:
                    break
                deadline.wait(0.001)
            said.append(running.restore())

    with server(path) as srv:
        running = tap.start(path, handler)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"ping")
            assert in_handler.wait(READY_TIMEOUT)
            other = threading.Thread(target=lambda: said.append(running.restore()))
            other.start()
            other.join(READY_TIMEOUT)
            assert not other.is_alive(), "restore() from two threads deadlocked"
            assert recv_exactly(client, 4) == b"ping"
        running.stop(grace=5.0)
    assert len(said) == 2
    assert said[0] == said[1]
    assert said[0].startswith("restored ")


def test_a_drain_under_way_when_restore_is_called_does_not_end_the_relay_early(
    sockdir: Path, tapping: Tapping, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() waits while restore() is called elsewhere and the last connection ends: a
    client that reached the relay's socket just before the restore is relayed all the same
    (the loop that relays must not end while the relay still accepts)."""
    monkeypatch.setattr(relay, "DRAIN_AFTER_RESTORE", 2.0)  # a wide window
    path = sockdir / "app.sock"
    with server(path) as srv:
        running, _ = tapping(path)
        first = socket.socket(socket.AF_UNIX)
        first.settimeout(READY_TIMEOUT)
        first.connect(str(path))
        first.sendall(b"one")
        assert recv_exactly(first, 3) == b"one"
        at_relay = os.open(path, os.O_PATH | os.O_CLOEXEC)  # the relay's socket file
        try:
            drained: list[bool] = []
            drainer = threading.Thread(target=lambda: drained.append(running.drain(None)))
            drainer.start()
            idle = running._relay._idle
            for _ in range(int(READY_TIMEOUT * 1000)):  # until drain() waits
                if idle._waiters:  # drain() is in wait_for()
                    break
                threading.Event().wait(0.001)
            restorer = threading.Thread(target=running.restore)  # waits out the window
            restorer.start()
            for _ in range(int(READY_TIMEOUT * 1000)):  # until the server's socket is back
                if path.stat().st_ino == srv.inode:
                    break
                threading.Event().wait(0.001)
            first.close()
            drainer.join(READY_TIMEOUT)
            assert drained == [True]
            with socket.socket(socket.AF_UNIX) as late:  # queued on the relay just before
                late.settimeout(READY_TIMEOUT)
                late.connect(f"/proc/self/fd/{at_relay}")
                late.sendall(b"two")
                assert recv_exactly(late, 3) == b"two"
            restorer.join(READY_TIMEOUT)
        finally:
            os.close(at_relay)
            first.close()
        running.stop(grace=5.0)


def test_a_datagram_client_that_never_reads_its_replies_stalls_no_other(
    sockdir: Path, tapping: Tapping
) -> None:
    """A bound client sends many datagrams and reads none of the replies: once its queue is
    full, its replies are dropped (and said to be) after a bounded wait, and another
    client's datagram and reply still pass, and the tap still stops."""
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path)
    try:
        running, events = tapping(path)
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stalled,
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other,
        ):
            stalled.bind(str(sockdir / "stalled.sock"))
            stalled.settimeout(READY_TIMEOUT)
            queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
            for n in range(queue + 2):  # one more reply than its queue holds
                stalled.sendto(b"unread %d" % n, str(path))
            # Until the relay is sending the reply that does not fit (it reports first).
            events.wait_for(
                lambda seen: (
                    sum(isinstance(e, tap.Data) and e.direction == "down" for e in seen)
                    >= queue + 2
                )
            )
            other.bind(str(sockdir / "other.sock"))
            other.settimeout(READY_TIMEOUT)
            other.sendto(b"ping", str(path))
            assert other.recv(64) == b"PING"
            stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
            stopper.start()
            stopper.join(READY_TIMEOUT)
            assert not stopper.is_alive(), "the tap did not stop"
        dropped = [e for e in events.of(tap.Refused) if "reply not delivered" in e.reason]
        assert dropped
        assert "does not read" in dropped[0].reason
    finally:
        srv.close()


def test_a_datagram_server_that_stops_reading_does_not_keep_the_tap_from_stopping(
    sockdir: Path, tapping: Tapping
) -> None:
    """The relay waits while the server's queue is full (its clients would wait too), but
    stop() ends that wait: the datagram is reported as not delivered."""
    path = sockdir / "dgram.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:  # never reads
        deaf.bind(str(path))
        running, events = tapping(path)
        queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.settimeout(READY_TIMEOUT)
            for n in range(queue + 2):  # one more than the server's queue holds
                client.sendto(b"unheard %d" % n, str(path))
            events.wait_for(lambda seen: sum(isinstance(e, tap.Data) for e in seen) >= queue + 2)
            stopper = threading.Thread(target=running.stop, kwargs={"grace": 1.0})
            stopper.start()
            stopper.join(READY_TIMEOUT)
            assert not stopper.is_alive(), "the tap did not stop"
    lost = [e.reason for e in events.of(tap.Refused)]
    assert lost == ["not delivered: the server did not read before the tap stopped"]


def test_a_failure_inside_the_relay_ends_one_connection_not_the_others(
    sockdir: Path,
    tapping: Tapping,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception while relaying one connection (injected: describing a passed
    descriptor fails) ends that connection and is logged; the loop goes on for the rest."""

    def broken(fd: int) -> tap.PassedFd:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(pump, "describe", broken)
    path = sockdir / "app.sock"
    with server(path):
        running, _ = tapping(path)
        with socket.socket(socket.AF_UNIX) as failing, socket.socket(socket.AF_UNIX) as other:
            failing.settimeout(READY_TIMEOUT)
            failing.connect(str(path))
            r, w = os.pipe()
            try:
                failing.sendmsg(
                    [b"fd"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())],
                )
            finally:
                os.close(r)
                os.close(w)
            assert failing.recv(16) == b""  # ended, not relayed
            other.settimeout(READY_TIMEOUT)
            other.connect(str(path))
            other.sendall(b"still relayed")
            assert recv_exactly(other, 13) == b"still relayed"
        running.stop(grace=5.0)
    assert "relaying connection 1 failed" in caplog.text
    assert "injected fault" in caplog.text


def test_a_second_restore_returns_after_the_first_was_reported(sockdir: Path) -> None:
    """restore() from one thread is reporting (the handler is busy); restore() or stop()
    from another returns only after that report, so nothing is delivered after stop()."""
    path = sockdir / "app.sock"
    busy = threading.Event()
    release = threading.Event()
    events = Recorder()

    def handler(event: tap.Event) -> None:
        events(event)
        if isinstance(event, tap.Data) and not busy.is_set():
            busy.set()
            release.wait(READY_TIMEOUT)

    def restored() -> int:
        return sum(
            isinstance(e, tap.Notice) and e.text.startswith("restored") for e in events.events
        )

    with server(path) as srv:
        running = tap.start(path, handler)
        seen: list[int] = []
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(READY_TIMEOUT)
                client.connect(str(path))
                client.sendall(b"ping")
                assert busy.wait(READY_TIMEOUT)
                first = threading.Thread(target=running.restore)
                first.start()
                for _ in range(int(READY_TIMEOUT * 1000)):  # until it moved the file back
                    if path.stat().st_ino == srv.inode:
                        break
                    threading.Event().wait(0.001)
                second = threading.Thread(
                    target=lambda: (running.restore(), seen.append(restored()))
                )
                second.start()
                second.join(0.2)
                assert second.is_alive(), "the second restore() did not wait for the report"
                release.set()
                second.join(READY_TIMEOUT)
                first.join(READY_TIMEOUT)
                assert recv_exactly(client, 4) == b"ping"
        finally:
            release.set()
            running.stop(grace=5.0)
    assert seen == [1]


def test_a_connection_epoll_refuses_to_watch_is_ended_and_the_rest_relayed(
    sockdir: Path,
    tapping: Tapping,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """epoll refuses to watch a new connection's sockets (injected ENOSPC, as at
    fs.epoll.max_user_watches): that connection is ended and logged, the loop goes on."""
    watch = pump.Pump._watch
    failed: list[int] = []

    def refusing(pump: object, conn: pump.Connection) -> None:
        if not failed:
            failed.append(conn.id)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        watch(pump, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(pump.Pump, "_watch", refusing)
    path = sockdir / "app.sock"
    with server(path):
        running, _ = tapping(path)
        with socket.socket(socket.AF_UNIX) as refused, socket.socket(socket.AF_UNIX) as other:
            refused.settimeout(READY_TIMEOUT)
            refused.connect(str(path))
            assert refused.recv(16) == b""  # ended, not relayed
            other.settimeout(READY_TIMEOUT)
            other.connect(str(path))
            other.sendall(b"still relayed")
            assert recv_exactly(other, 13) == b"still relayed"
        running.stop(grace=5.0)
    assert failed == [1]
    assert "relaying connection 1 failed" in caplog.text


def test_datagram_clients_that_never_pause_do_not_hold_up_the_servers_replies(
    sockdir: Path,
) -> None:
    """The relay's queue never empties (the handler sends another datagram for each one
    relayed): a reply the server sent meanwhile still reaches its client before the flood
    ends."""
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path)
    flood_cap = 20_000
    flooded: list[int] = []
    answered_after: list[int] = []
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as flooder,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client,
    ):
        flooder.setblocking(False)
        client.bind(str(sockdir / "client.sock"))
        client.setblocking(False)

        def handler(event: tap.Event) -> None:
            if not isinstance(event, tap.Data):
                return
            if event.direction == "down":
                answered_after.append(len(flooded))
            elif event.data == b"flood" and not answered_after and len(flooded) < flood_cap:
                if not flooded:
                    client.sendto(b"ping", str(path))  # queued behind the flood
                flooder.sendto(b"flood", str(path))  # keeps the relay's queue from emptying
                flooded.append(1)

        running = tap.start(path, handler)
        try:
            flooder.sendto(b"flood", str(path))
            client.settimeout(READY_TIMEOUT)
            assert client.recv(64) == b"PING"
        finally:
            running.stop(grace=5.0)
            srv.close()
    assert answered_after
    assert answered_after[0] < flood_cap, "the reply waited for the flood to end"


class _OutOfDescriptors:
    """The relay's listening socket, whose next accept() calls fail as given."""

    def __init__(self, real: socket.socket, failures: list[int]) -> None:
        self._real = real
        self._failures = failures

    def accept(self) -> tuple[socket.socket, object]:
        if self._failures:
            code = self._failures.pop(0)
            raise OSError(code, os.strerror(code))
        return self._real.accept()

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        self._real.close()


def test_running_out_of_descriptors_is_said_once_and_the_client_is_relayed_after(
    sockdir: Path, tapping: Tapping, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="udskit")
    path = sockdir / "app.sock"
    with server(path):
        running, _ = tapping(path)
        failing = _OutOfDescriptors(running._relay._listener, [errno.EMFILE, errno.EMFILE])
        running._relay._listener = failing  # type: ignore[assignment]
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"after the pause")
            assert recv_exactly(client, 15) == b"after the pause"
        assert not failing._failures
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # One warning as the failures begin, saying what to do; one as accepting works again.
    assert sum("accept failed (Too many open files)" in line for line in said) == 1, said
    assert any("ulimit -n" in line for line in said), said
    assert sum("accepting again, after 2 failed tries" in line for line in said) == 1, said
