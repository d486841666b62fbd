"""The public handover API's bad inputs, each a clear one-line error that leaves nothing
behind; and drain_timeout: a client that never leaves is closed, and the old one exits."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from pathlib import Path

import pytest

import udskit
import udskit.aio

from .harness import FLAVOURS, PATIENCE, Child, ask, control_path, start_serving


def handler(*_: object) -> None:
    pass


async def async_handler(*_: object) -> None:
    pass


def make_server(flavour: str, path: Path, **options: object) -> object:
    if flavour == "server":
        return udskit.Server(path, handler, **options)
    if flavour == "messageserver":
        return udskit.MessageServer(path, handler, **options)
    if flavour == "aioserver":
        return asyncio.run(udskit.aio.start_server(path, async_handler, **options))
    return asyncio.run(udskit.aio.start_message_server(path, handler, **options))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("address", ["@some-name", "abstract:x", "tcp:127.0.0.1:0", "fd:3"])
@pytest.mark.usefixtures("no_fd_leak")
def test_handover_needs_a_socket_path(address: str) -> None:
    expected = f"handover needs a socket path, not {udskit.Address.parse(address)}"
    for make in (
        lambda: udskit.listen(address, handover=True),
        lambda: udskit.Upgrader(address),
        lambda: udskit.Server(address, handler, handover=True),
        lambda: udskit.MessageServer(address, handler, handover=True),
    ):
        with pytest.raises(udskit.AddressError) as caught:
            make()
        assert one_line(caught.value).startswith(expected)


@pytest.mark.parametrize("flavour", ["listen", *FLAVOURS])
@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
@pytest.mark.usefixtures("no_fd_leak")
def test_handover_must_be_a_bool(sockdir: Path, flavour: str, value: object) -> None:
    path = sockdir / "s.sock"

    def make() -> object:
        if flavour == "listen":
            return udskit.listen(path, handover=value)  # type: ignore[call-overload]
        return make_server(flavour, path, handover=value)

    with pytest.raises(TypeError) as caught:
        make()
    assert one_line(caught.value) == f"handover must be True or False, not {value!r}"
    assert os.listdir(sockdir) == []


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "x", True, None])
@pytest.mark.usefixtures("no_fd_leak")
def test_drain_timeout_must_be_positive_seconds(sockdir: Path, flavour: str, value: object) -> None:
    path = sockdir / "s.sock"
    with pytest.raises(ValueError) as caught:
        make_server(flavour, path, handover=True, drain_timeout=value)
    assert one_line(caught.value) == (
        f"drain_timeout must be a positive number of seconds, not {value!r}"
    )
    assert os.listdir(sockdir) == [], "a refused server left its socket file behind"


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, "1", False, None])
@pytest.mark.usefixtures("no_fd_leak")
def test_ready_timeout_must_be_positive_seconds(sockdir: Path, value: object) -> None:
    with pytest.raises(ValueError) as caught:
        udskit.Upgrader(sockdir / "s.sock", ready_timeout=value)  # type: ignore[arg-type]
    assert one_line(caught.value) == (
        f"ready_timeout must be a positive number of seconds, not {value!r}"
    )
    assert os.listdir(sockdir) == []


@pytest.mark.parametrize("command", ["not a list", b"argv", [], [1], ["prog", None], ("",)[:0]])
@pytest.mark.usefixtures("no_fd_leak")
def test_command_must_be_an_argv(sockdir: Path, command: object) -> None:
    with pytest.raises(ValueError) as caught:
        udskit.Upgrader(sockdir / "s.sock", command=command)  # type: ignore[arg-type]
    assert one_line(caught.value) == (
        f"command must be a non-empty list of str (an argv), not {command!r}"
    )
    assert os.listdir(sockdir) == []


@pytest.mark.usefixtures("no_fd_leak")
def test_a_path_held_by_a_server_without_handover(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with udskit.listen(path), pytest.raises(udskit.AddressInUse) as caught:
        udskit.Upgrader(path)
    assert one_line(caught.value) == (
        f"cannot take over {path}: the live server there (pid {os.getpid()}, uid "
        f"{os.geteuid()}) offers no handover (started without it, handing over right now, "
        "or unable to make its handover socket: see its log); retry, or stop it first"
    )
    assert caught.value.pid == os.getpid()


@pytest.mark.usefixtures("no_fd_leak")
def test_a_path_that_is_not_a_socket(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    path.write_text("precious")
    with pytest.raises(udskit.SocketFileError):
        udskit.Upgrader(path)
    assert path.read_text() == "precious"


def test_a_server_that_cannot_make_its_control_socket(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    control_path(path).write_text("not ours")
    with start_serving_without_offer(path) as a, Child("server", path, "stream") as b:
        assert a.expect("cannot offer handover") == (
            f"log: WARNING {path}: cannot offer handover (cannot listen on "
            f"{control_path(path)}: a regular file is in the way, and udskit never deletes "
            "what is not a socket; move it away or choose another path); the server runs, "
            "but cannot be handed over"
        )
        assert b.expect("error").startswith(
            f"error AddressInUse: cannot take over {path}: the live server there (pid {a.pid}, "
        )
        assert b.finish() == 0
        assert ask(path, "stream", b"x") == f"{a.pid}:x".encode()
        assert a.terminate() == 0
    assert control_path(path).read_text() == "not ours"
    assert not os.path.lexists(path)


def start_serving_without_offer(path: Path) -> Child:
    child = Child("server", path, "stream")
    child.expect("listening")
    return child


def test_a_successor_of_another_type(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with start_serving("server", path, "stream") as a, Child("server", path, "dgram") as b:
        assert b.expect("error") == (
            f"error HandoverError: cannot take over {path}: {path} serves type=stream, not "
            "type=dgram"
        )
        assert b.finish() == 0
        assert b.leaked() == "leaked []"
        assert a.terminate() == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_client_that_never_leaves_is_closed_after_drain_timeout(
    flavour: str, sockdir: Path
) -> None:
    path = sockdir / "s.sock"
    with start_serving(flavour, path, "stream", "--drain-timeout", "0.3") as a:
        stayer = udskit.connect(path, timeout=PATIENCE)
        stayer.send(b"hi")
        assert stayer.recv() == f"{a.pid}:hi".encode()
        with Child(flavour, path, "stream") as b:
            b.expect(f"took over from pid {a.pid}")
            a.expect("1 client(s) still connected 0.3 s after the handover; closing them")
            assert a.finish() == 0
            assert a.leaked() == "leaked []"
            with pytest.raises(udskit.ConnectionClosed):
                stayer.recv()
            stayer.close()
            assert os.path.exists(path)
            assert b.terminate() == 0
        assert not os.path.lexists(path)


def wait_until_polling(thread: threading.Thread) -> None:
    """Return once ``thread`` sleeps in poll() (the kernel says where it sleeps)."""
    deadline = time.monotonic() + PATIENCE
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    while "poll" not in wchan.read_text():
        assert thread.is_alive(), "it returned instead of waiting"
        assert time.monotonic() < deadline, f"not waiting in poll() but in {wchan.read_text()}"
        time.sleep(0.001)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
@pytest.mark.usefixtures("no_fd_leak")
def test_a_listener_taken_over_waits_though_the_old_server_made_it_non_blocking(
    sockdir: Path, kind: str
) -> None:
    path = sockdir / "s.sock"
    with start_serving("server", path, kind) as a:  # its server made the socket non-blocking
        with udskit.listen(path, type=kind, handover=True) as listener:
            upgrader = listener.upgrader
            assert upgrader is not None
            assert upgrader.previous_pid == a.pid
            assert not os.get_blocking(listener.fileno())
            upgrader.ready()
            a.expect(f"handed over to pid {os.getpid()}")
            assert a.finish() == 0
            got: list[bytes] = []

            def serve_one() -> None:
                if isinstance(listener, udskit.DatagramListener):
                    datagram = listener.recv()
                    with listener.session(datagram) as session:
                        session.send(b"mine:" + session.recv())
                    got.append(datagram.data)
                    return
                with listener.accept() as channel:
                    got.append(channel.recv())
                    channel.send(b"mine:" + got[-1])

            server = threading.Thread(target=serve_one)
            server.start()
            try:
                wait_until_polling(server)  # nothing queued: it waits, and does not fail
                assert ask(path, kind, b"x") == b"mine:x"
            finally:
                server.join(PATIENCE)
            assert got == [b"x"]
            assert upgrader.handed_over is False
            assert upgrader.successor_pid is None
        assert not os.path.lexists(path)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_stop_cuts_the_drain_short_and_leaves_the_file(flavour: str, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with start_serving(flavour, path, "stream") as a:  # drain_timeout: the default, 30 s
        stayer = udskit.connect(path, timeout=PATIENCE)
        stayer.send(b"hi")
        assert stayer.recv() == f"{a.pid}:hi".encode()
        with Child(flavour, path, "stream") as b:
            b.expect(f"took over from pid {a.pid}")
            a.expect("handed over; finishing 1 client(s), for at most 30 s")
            assert a.terminate() == 0  # well within the drain timeout
            assert a.leaked() == "leaked []"
            with pytest.raises(udskit.ConnectionClosed):
                stayer.recv()
            stayer.close()
            assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
            assert b.terminate() == 0
        assert not os.path.lexists(path)
