"""Only the serving user and root are given the listener, and a successor takes one only
from its own user or root; everyone else is refused with a clear error, and logged."""

from __future__ import annotations

import json
import os
import socket
from array import array
from collections.abc import Callable
from pathlib import Path

import udskit
from udskit.ancillary import ancillary_size

from ..integration.children import NOBODY, Talker, needs_root
from .harness import PATIENCE, Child, ask, control_path, start_serving, wait_for


def open_to_others(directory: Path) -> None:
    directory.chmod(0o755)


@needs_root
def test_another_user_cannot_reach_the_control_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    open_to_others(sockdir)
    with start_serving("server", path, "stream", "--mode", "666") as a:
        control = os.stat(control_path(path))
        assert control.st_mode & 0o777 == 0o600
        assert control.st_uid == os.geteuid()

        def take(say: Callable[[str], None]) -> None:
            try:
                udskit.Upgrader(path)
            except udskit.UdsError as exc:
                say(f"{type(exc).__name__}: {exc}")

        with Talker(take, as_user=NOBODY) as other:
            assert other.line() == (
                f"HandoverError: cannot take over {path}: its handover socket "
                f"{control_path(path)} refuses this user; run as the user that serves it, "
                "or as root"
            )
        assert other.finish() == 0
        assert ask(path, "stream", b"x") == f"{a.pid}:x".encode()
        assert a.terminate() == 0
        assert a.leaked() == "leaked []"


@needs_root
def test_another_user_that_gets_through_is_refused_by_its_credentials(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    open_to_others(sockdir)
    with start_serving("aiomessageserver", path, "stream") as a:
        control_path(path).chmod(0o666)  # as if the permissions failed to keep it out

        def take(say: Callable[[str], None]) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conv:
                conv.settimeout(PATIENCE)
                conv.connect(str(control_path(path)))
                try:  # it may have answered and hung up already
                    conv.send(b'{"op":"take","version":1,"type":"stream"}')
                except BrokenPipeError:
                    pass
                try:
                    data, ancdata, _, _ = conv.recvmsg(8192, ancillary_size(4))
                except ConnectionResetError:  # it closed with our request unread
                    data, ancdata, _, _ = conv.recvmsg(8192, ancillary_size(4))
                say(f"{len(ancdata)} {data.decode()}")
                # And through the library, a few times over: the reason, never a bare
                # OSError (the refusal races with the request).
                for _ in range(5):
                    try:
                        udskit.Upgrader(path)
                    except udskit.UdsError as exc:
                        say(f"{type(exc).__name__}: {exc}")

        with Talker(take, as_user=NOBODY) as other:
            count, _, answer = other.line().partition(" ")
            for _ in range(5):
                assert other.line() == (
                    f"HandoverError: cannot take over {path}: uid {NOBODY} may not take over; "
                    f"only uid {os.geteuid()} or root"
                )
        assert other.finish() == 0
        assert count == "0", "another user was given a descriptor"
        assert json.loads(answer) == {
            "op": "error",
            "reason": f"uid {NOBODY} may not take over; only uid {os.geteuid()} or root",
        }
        a.expect(f"refused a handover to pid {other.pid}, uid {NOBODY}")
        assert ask(path, "stream", b"x") == f"{a.pid}:x".encode()
        assert a.terminate() == 0
        assert a.leaked() == "leaked []"


@needs_root
def test_a_successor_never_trusts_a_control_socket_of_another_user(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    sockdir.chmod(0o777)  # anyone may put files here, so anyone may pose as the server

    def pose(say: Callable[[str], None]) -> None:
        listener = udskit.listen(path, mode=0o666)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ctl:
            ctl.bind(str(control_path(path)))
            os.chmod(control_path(path), 0o666)
            ctl.listen()
            say("posing")
            conv, _ = ctl.accept()
            request = conv.recv(8192)
            say(f"asked {request!r}")
            if request:
                conv.sendmsg(
                    [b'{"op":"listener","type":"stream","pid":%d}' % os.getpid()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [listener.fileno()]))],
                )
            conv.close()
        listener.close()

    with Talker(pose, as_user=NOBODY) as other:
        assert other.line() == "posing"
        try:
            udskit.Upgrader(path)
        except udskit.AddressInUse as exc:
            error = str(exc)
        else:
            raise AssertionError("took a listener from another user")
        # It never even connected: another user's file at the name is no handover socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.connect(str(control_path(path)))  # (lets the poser finish)
        assert other.line() == "asked b''"
    assert other.finish() == 0
    assert error.startswith(f"cannot take over {path}: the live server there (pid ")
    assert f", uid {NOBODY}) offers no handover" in error


@needs_root
def test_the_socket_file_keeps_its_owner_and_mode(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("server", path, "stream", "--owner", str(NOBODY), "--mode", "660") as a:
        before = os.stat(path)
        assert (before.st_uid, before.st_mode & 0o777) == (NOBODY, 0o660)
        # The successor asks for another mode and no owner: a file taken over keeps its own.
        with Child("messageserver", path, "stream", "--mode", "600") as b:
            b.expect(f"took over from pid {a.pid}")
            assert a.finish() == 0
            after = os.stat(path)
            assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode) == (
                before.st_ino,
                before.st_uid,
                before.st_gid,
                before.st_mode,
            )
            wait_for(control_path(path))  # B's, which it makes once it has taken over
            control = os.stat(control_path(path))
            assert (control.st_uid, control.st_mode & 0o777) == (os.geteuid(), 0o600)
            assert b.terminate() == 0
    assert not os.path.lexists(path)
