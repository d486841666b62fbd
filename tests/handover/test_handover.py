"""A→B (→C) handover through each of the four servers, for each socket type, with clients
connecting throughout: nothing refused, nothing lost, the socket file untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import udskit

from .harness import FLAVOURS, PATIENCE, TYPES, Child, ask, control_path, load, start_serving


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_handover_keeps_the_socket_and_every_client(flavour: str, kind: str, sockdir: Path) -> None:
    path = sockdir / "app.sock"
    children: list[Child] = []
    try:
        a = start_serving(flavour, path, kind)
        children.append(a)
        before = os.stat(path)
        assert before.st_mode & 0o777 == 0o640
        # A client of A's from before the handover: A serves it to its end.
        early = udskit.connect(path, type=kind, timeout=PATIENCE)
        early.send(b"hello")
        assert early.recv() == f"{a.pid}:hello".encode()
        with load(path, kind) as clients:
            clients.wait_served_by(a.pid)
            b = Child(flavour, path, kind)
            children.append(b)
            b.expect(f"took over from pid {a.pid}")
            a.expect(f"handed over to pid {b.pid}")
            clients.wait_served_by(b.pid)
            if kind != "dgram":
                # A drains: its early client is still served, by A.
                early.send(b"again")
                assert early.recv() == f"{a.pid}:again".encode()
            early.close()
            assert a.finish() == 0
            assert a.said("returned")
            assert a.leaked() == "leaked []"
            assert os.path.exists(path), "the old process removed the socket file"
            after = os.stat(path)
            assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
            assert after.st_mode == before.st_mode
            assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
            clients.wait_served_by(b.pid)
        assert clients.failures == []
        assert b.terminate() == 0
        assert b.leaked() == "leaked []"
        assert not os.path.lexists(path), "the new process left the socket file behind"
        assert not os.path.lexists(control_path(path))
    finally:
        for child in children:
            child.kill()


@pytest.mark.parametrize("length", [95, 140])
def test_a_path_whose_control_socket_is_longer_than_sun_path(sockdir: Path, length: int) -> None:
    # 95: the socket's path fits in sun_path, its control socket's does not; 140: neither.
    sub = sockdir / ("d" * (length - len(str(sockdir)) - len("/a.sock") - 1))
    sub.mkdir()
    path = sub / "a.sock"
    assert len(str(path)) == length
    assert len(str(control_path(path))) > 108
    with start_serving("server", path, "stream") as a, Child("messageserver", path, "stream") as b:
        b.expect(f"took over from pid {a.pid}")
        assert a.finish() == 0
        assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
        assert b.terminate() == 0
        assert b.leaked() == "leaked []"
    assert os.listdir(sub) == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_clients_queued_in_the_backlog_are_served_by_the_new_one(
    flavour: str, sockdir: Path
) -> None:
    path = sockdir / "app.sock"
    with start_serving(flavour, path, "stream", "--max-clients", "1") as a:
        stayer = udskit.connect(path, timeout=PATIENCE)
        stayer.send(b"1")
        assert stayer.recv() == f"{a.pid}:1".encode()
        # A is full: these wait in the listener's backlog, their requests sent.
        queued = [udskit.connect(path, timeout=PATIENCE) for _ in range(3)]
        for n, client in enumerate(queued):
            client.send(b"q%d" % n)
        with Child(flavour, path, "stream") as b:
            b.expect(f"took over from pid {a.pid}")
            for n, client in enumerate(queued):
                assert client.recv() == f"{b.pid}:q{n}".encode()
                client.close()
            stayer.send(b"2")
            assert stayer.recv() == f"{a.pid}:2".encode()
            stayer.close()
            assert a.finish() == 0
            assert a.leaked() == "leaked []"
            assert b.terminate() == 0
    assert not os.path.lexists(path)
