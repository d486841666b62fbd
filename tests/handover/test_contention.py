"""One handover at a time; chains of handovers; another user is never given the listener."""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit

from ..conftest import READY_TIMEOUT
from ..integration.children import Talker
from .harness import PATIENCE, Child, ask, control_path, load, start_serving, wait_for


def test_a_second_successor_is_told_who_is_taking_over(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("server", path, "stream") as a, Child("upgrader", path, "stream") as b:
        b.expect(f"listening {a.pid}")  # B has the listener and has not said ready yet
        with Child("server", path, "stream") as c:
            line = c.expect("error")
            assert line == (
                f"error HandoverError: cannot take over {path}: pid {b.pid} is taking over "
                f"{path} now; try again when it is done"
            )
            assert c.finish() == 0
            assert c.leaked() == "leaked []"
        b.tell("ready")
        b.expect("ready")
        a.expect(f"handed over to pid {b.pid}")
        assert a.finish() == 0
        assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
        b.tell("close")
        assert b.finish() == 0
    assert not os.path.lexists(path)


def successor(
    path: Path, pipes: tuple[int, int, int, int]
) -> Callable[[Callable[[str], None]], None]:
    """A successor in a forked child: it asks for the listener as the first pipe closes,
    and says ready as the second does."""
    go, go_w, ready, ready_w = pipes

    def run(say: Callable[[str], None]) -> None:
        os.close(go_w)  # the parent's ends: closed there, they must be closed here too
        os.close(ready_w)
        select.select([go], [], [], READY_TIMEOUT)
        try:
            upgrader = udskit.Upgrader(path)
        except udskit.HandoverError as exc:
            say(f"HandoverError: {exc}")
            return
        with upgrader:
            say(f"taken from {upgrader.previous_pid}")
            select.select([ready], [], [], READY_TIMEOUT)
            upgrader.ready()
            say("ready")

    return run


@pytest.mark.parametrize("attempt", range(3))
def test_two_successors_at_once_one_wins(sockdir: Path, attempt: int) -> None:
    path = sockdir / "app.sock"
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        with start_serving("server", path, "stream") as a:
            pipes = (go_r, go_w, ready_r, ready_w)
            with Talker(successor(path, pipes)) as b, Talker(successor(path, pipes)) as c:
                os.close(go_w)  # both ask at once
                go_w = -1
                outcome = {b.pid: b.line(), c.pid: c.line()}
                winners = [pid for pid, line in outcome.items() if line == f"taken from {a.pid}"]
                assert len(winners) == 1, outcome
                loser = c.pid if winners == [b.pid] else b.pid
                assert outcome[loser] == (
                    f"HandoverError: cannot take over {path}: pid {winners[0]} is taking over "
                    f"{path} now; try again when it is done"
                )
                os.close(ready_w)
                ready_w = -1
                winner = b if winners == [b.pid] else c
                assert winner.line() == "ready"
                a.expect(f"handed over to pid {winner.pid}")
                assert a.finish() == 0
                assert a.leaked() == "leaked []"
            assert (b.finish(), c.finish()) == (0, 0)
    finally:
        for fd in (go_r, go_w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
    assert not os.path.lexists(path)


def test_a_chain_of_handovers_across_server_kinds(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    chain = ["messageserver", "aioserver", "aiomessageserver", "server", "messageserver"]
    first = start_serving(chain[0], path, "seqpacket")
    children = [first]
    try:
        inode = os.stat(path).st_ino
        with load(path, "seqpacket") as clients:
            for flavour in chain[1:]:
                old = children[-1]
                new = Child(flavour, path, "seqpacket")
                children.append(new)
                new.expect(f"took over from pid {old.pid}")
                assert old.finish() == 0
                assert old.leaked() == "leaked []"
                clients.wait_served_by(new.pid)
                assert os.stat(path).st_ino == inode
        assert clients.failures == []
        assert set(clients.served_by) == {child.pid for child in children}
        assert children[-1].terminate() == 0
        assert children[-1].leaked() == "leaked []"
        assert not os.path.lexists(path)
        assert not os.path.lexists(control_path(path))
    finally:
        for child in children:
            child.kill()


def test_a_handover_while_the_first_old_one_still_drains(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("aioserver", path, "stream") as a:
        stayer = udskit.connect(path, timeout=PATIENCE)
        stayer.send(b"1")
        assert stayer.recv() == f"{a.pid}:1".encode()
        with Child("server", path, "stream") as b:
            b.expect(f"took over from pid {a.pid}")
            wait_for(control_path(path))  # B's: A removed its own before B took over
            c = Child("messageserver", path, "stream")
            try:
                c.expect(f"took over from pid {b.pid}")
                assert b.finish() == 0
                # A still serves its client, and neither old one removed the file.
                stayer.send(b"2")
                assert stayer.recv() == f"{a.pid}:2".encode()
                assert ask(path, "stream", b"x") == f"{c.pid}:x".encode()
                stayer.close()
                assert a.finish() == 0
                assert a.leaked() == "leaked []"
                assert os.path.exists(path)
                assert c.terminate() == 0
            finally:
                c.kill()
    assert not os.path.lexists(path)
