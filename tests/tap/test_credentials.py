"""The server sees each client, not the tap: as root the relay connects (and sends
datagrams) with the client's credentials; without root it refuses another user's client
rather than connect for it with its own."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from udskit import tap
from udskit.creds import UCRED

from ..conftest import READY_TIMEOUT
from ..integration.children import NOBODY, fork, needs_root, reap, run_in_child
from .conftest import Recorder
from .servers import DatagramEcho, server, tell_creds

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]

Tapping = Callable[..., tuple[tap.Tap, Recorder]]


def _ask(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(READY_TIMEOUT)
        client.connect(str(path))
        return client.recv(100).decode().strip() or "closed"


def test_the_server_sees_the_clients_uid_and_gid_not_roots(sockdir: Path, tapping: Tapping) -> None:
    sockdir.chmod(0o755)
    path = sockdir / "creds.sock"
    with server(path, tell_creds, mode=0o666):
        running, events = tapping(path)
        as_nobody = run_in_child(lambda: _ask(path), as_user=NOBODY, groups=[NOBODY])
        as_root = _ask(path)
        running.stop(grace=5.0)
    pid, uid, gid = as_nobody.split()
    assert (uid, gid) == (str(NOBODY), str(NOBODY))
    assert int(pid) != os.getpid()  # the connector's pid: the client's is not ours to give
    assert as_root.split()[1:] == ["0", "0"]
    assert not events.of(tap.Refused)


def test_datagrams_carry_their_senders_credentials(sockdir: Path, tapping: Tapping) -> None:
    sockdir.chmod(0o755)
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path, mode=0o666)
    go_r, go_w = os.pipe()
    try:
        running, _ = tapping(path)

        def send() -> int:
            os.close(go_w)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"who am i", str(path))
            os.read(go_r, 1)  # alive until the server has the datagram: its pid still names it
            return 0

        sender = fork(send, as_user=NOBODY)
        os.close(go_r)
        srv.wait_seen(1)
        os.close(go_w)
        assert reap(sender) == 0
        running.stop(grace=5.0)
    finally:
        srv.close()
    (seen,) = [cred for data, _, cred in srv.seen if data == b"who am i"]
    assert seen == (sender, NOBODY, NOBODY)


def test_a_datagram_whose_sender_has_exited_still_goes_with_its_uid_and_gid(
    sockdir: Path, tapping: Tapping
) -> None:
    """The kernel takes no SCM_CREDENTIALS naming a pid that is gone: the datagram of a
    sender that sent and exited is delivered with its uid and gid and the tap's pid."""
    sockdir.chmod(0o755)
    path = sockdir / "dgram.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        srv.bind(str(path))
        path.chmod(0o666)
        running, _ = tapping(path)
        # The server reads nothing yet: once its queue is full, the relay waits to send,
        # and the sender's datagram, queued behind these, is relayed only after it exited.
        queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ours:
            for n in range(queue + 2):
                ours.sendto(b"filler %d" % n, str(path))

        def send_and_exit() -> int:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"fire and forget", str(path))
            return 0

        assert reap(fork(send_and_exit, as_user=NOBODY)) == 0
        srv.settimeout(READY_TIMEOUT)
        for _ in range(queue + 3):
            data, ancdata, _, _ = srv.recvmsg(64, socket.CMSG_SPACE(UCRED.size))
            if data == b"fire and forget":
                break
        else:
            raise AssertionError("the datagram of the exited sender never arrived")
        running.stop(grace=5.0)
    (cred,) = [
        UCRED.unpack(p[: UCRED.size]) for _, kind, p in ancdata if kind == socket.SCM_CREDENTIALS
    ]
    assert cred == (os.getpid(), NOBODY, NOBODY)  # the tap runs in this process


def test_a_tap_without_root_refuses_another_users_client(sockdir: Path) -> None:
    """The tap runs as nobody in front of nobody's socket: nobody's clients are relayed,
    root's are refused and told nothing of the server."""
    os.chown(sockdir, NOBODY, NOBODY)
    path = sockdir / "app.sock"
    started_r, started_w = os.pipe()
    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    with server(path, tell_creds, mode=0o666):
        os.chown(path, NOBODY, NOBODY)

        def child() -> int:
            os.close(started_r)
            os.close(stop_w)
            os.close(report_r)
            recorder = Recorder()
            running = tap.start(path, recorder)
            os.write(started_w, b"!")
            os.read(stop_r, 1)  # until the parent closes its end
            running.stop(grace=5.0)
            refused = [e.reason for e in recorder.of(tap.Refused)]  # type: ignore[union-attr]
            os.write(report_w, "\n".join(refused).encode())
            return 0

        pid = fork(child, as_user=NOBODY)
        for fd in (started_w, stop_r, report_w):
            os.close(fd)
        try:
            assert select.select([started_r], [], [], READY_TIMEOUT)[0]
            assert os.read(started_r, 1) == b"!"
            as_root = _ask(path)
            as_nobody = run_in_child(lambda: _ask(path), as_user=NOBODY)
        finally:
            os.close(stop_w)
            report = os.read(report_r, 65536).decode()
            assert reap(pid) == 0
            os.close(started_r)
            os.close(report_r)
    assert as_root == "closed"
    assert as_nobody.split()[1:] == [str(NOBODY), str(NOBODY)]
    assert report == (
        "client uid 0 gid 0 is not the tap's user (uid 65534 gid 65534): connecting for it "
        "would give it the tap's rights; run the tap as root to relay other users' clients"
    )


def test_a_tap_without_root_refuses_another_users_datagrams(sockdir: Path) -> None:
    """As nobody, in front of nobody's datagram socket: root's datagram is shown as refused
    and never reaches the server; nobody's is delivered."""
    os.chown(sockdir, NOBODY, NOBODY)
    path = sockdir / "dgram.sock"
    started_r, started_w = os.pipe()
    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    srv = DatagramEcho(path, mode=0o666)
    try:
        os.chown(path, NOBODY, NOBODY)

        def child() -> int:
            os.close(started_r)
            os.close(stop_w)
            os.close(report_r)
            recorder = Recorder()
            running = tap.start(path, recorder)
            os.write(started_w, b"!")
            os.read(stop_r, 1)
            running.stop(grace=5.0)
            refused = [e.reason for e in recorder.of(tap.Refused)]  # type: ignore[union-attr]
            os.write(report_w, "\n".join(refused).encode())
            return 0

        pid = fork(child, as_user=NOBODY)
        for fd in (started_w, stop_r, report_w):
            os.close(fd)
        try:
            assert select.select([started_r], [], [], READY_TIMEOUT)[0]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"from root", str(path))

            def send() -> str:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(b"from nobody", str(path))
                return "sent"

            assert run_in_child(send, as_user=NOBODY) == "sent"
            srv.wait_seen(1)
        finally:
            os.close(stop_w)
            report = os.read(report_r, 65536).decode()
            assert reap(pid) == 0
            os.close(started_r)
            os.close(report_r)
    finally:
        srv.close()
    assert [data for data, _, _ in srv.seen] == [b"from nobody"]
    assert report == (
        "datagram from uid 0 gid 0 not relayed: the tap runs as uid 65534 and would send it "
        "with its own rights; run the tap as root"
    )
