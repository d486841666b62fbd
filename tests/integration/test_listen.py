"""Listeners beyond the socket file: iteration and closing from another thread, timeouts,
inherited descriptors (``fd:N``), TCP, datagram senders without a name, bad options."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import (
    AddressInUse,
    ConnectionClosed,
    DatagramListener,
    Listener,
    SocketFileError,
    Timeout,
    listening,
)
from udskit.sockfile import resolve_owner

from ..conftest import open_fds
from .conformance import Background

#: How long a test waits for a thread or a reply before failing.
PATIENCE = 20.0


@pytest.fixture(autouse=True)
def _no_leaks(no_fd_leak: None) -> None:
    """Every listener test leaves no descriptor open."""


@pytest.fixture
def path(sockdir: Path) -> Iterator[Path]:
    yield sockdir / "app.sock"
    assert not (sockdir / "app.sock").exists()


# -- iteration, closing, timeouts ---------------------------------------------------------


def test_iterating_a_listener_ends_when_another_thread_closes_it(path: Path) -> None:
    listener = udskit.listen(path)
    assert isinstance(listener, Listener)
    accepted: list[udskit.Channel] = []
    got_two = threading.Event()

    def serve() -> None:
        for channel in listener:  # blocks in accept() until close() wakes it
            accepted.append(channel)
            if len(accepted) == 2:
                got_two.set()

    helper = Background(serve)
    clients = [udskit.connect(path), udskit.connect(path)]
    try:
        assert got_two.wait(PATIENCE)
        listener.close()
        helper.join()  # iteration ended: no exception
        assert len(accepted) == 2
        with pytest.raises(ConnectionClosed, match="is closed"):
            listener.accept()
    finally:
        for channel in accepted + clients:
            channel.close()


def test_iterating_a_datagram_listener_ends_when_closed(path: Path) -> None:
    listener = udskit.listen(path, type="dgram")
    assert isinstance(listener, DatagramListener)
    received: list[bytes] = []
    got_one = threading.Event()

    def serve() -> None:
        for datagram in listener:
            received.append(datagram.data)
            got_one.set()

    helper = Background(serve)
    with udskit.connect(path, type="dgram") as client:
        client.send(b"one")
        assert got_one.wait(PATIENCE)
        listener.close()
        helper.join()
    assert received == [b"one"]
    with pytest.raises(ConnectionClosed, match="is closed"):
        listener.recv()
    with pytest.raises(ConnectionClosed, match="is closed"):
        listener.send_to(path, b"x")


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_listener_timeout(path: Path, kind: str) -> None:
    with udskit.listen(path, type=kind) as listener:
        listener.settimeout(0.05)
        wait = listener.recv if isinstance(listener, DatagramListener) else listener.accept
        with pytest.raises(Timeout, match="timed out"):
            wait()
        with pytest.raises(ValueError, match="timeout must be None or >= 0"):
            listener.settimeout(-1)
        assert repr(listener).startswith(f"<{type(listener).__name__} {kind} {path} fd=")
    assert repr(listener).endswith("closed>")


# -- inherited descriptors ----------------------------------------------------------------


def _inherited_listener(path: Path, kind: int = socket.SOCK_STREAM, listening: bool = True) -> int:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(os.fspath(path))
    if listening:
        sock.listen()
    return sock.detach()


def test_listen_on_an_inherited_descriptor(path: Path) -> None:
    fd = _inherited_listener(path)
    with udskit.listen(f"fd:{fd}") as listener:
        assert isinstance(listener, Listener)
        assert listener.fileno() == fd
        with udskit.connect(path) as client, listener.accept() as server:
            client.send(b"socket activation")
            assert server.recv() == b"socket activation"
    # The file was not ours to claim: it stays (as systemd's would).
    assert path.exists()
    path.unlink()


def test_listen_on_an_inherited_datagram_descriptor(path: Path) -> None:
    fd = _inherited_listener(path, socket.SOCK_DGRAM, listening=False)
    with (
        udskit.listen(f"fd:{fd}", type="dgram") as listener,
        udskit.connect(path, type="dgram") as client,
    ):
        client.send(b"hi")
        assert listener.recv().data == b"hi"
    path.unlink()


@pytest.mark.parametrize(
    ("kind", "listening", "asked", "message"),
    [
        (socket.SOCK_DGRAM, False, "stream", "is a dgram socket, not the stream socket type="),
        (socket.SOCK_STREAM, False, "stream", "is a stream socket that is not listening"),
    ],
)
def test_inherited_descriptor_of_the_wrong_kind(
    path: Path, kind: int, listening: bool, asked: str, message: str
) -> None:
    fd = _inherited_listener(path, kind, listening)
    try:
        with pytest.raises(SocketFileError, match=message):
            udskit.listen(f"fd:{fd}", type=asked)
        os.fstat(fd)  # refused, but left open for its owner
    finally:
        os.close(fd)
        path.unlink()


def test_inherited_descriptor_that_is_not_open(path: Path) -> None:
    spare = max(open_fds()) + 100
    with pytest.raises(SocketFileError, match=f"descriptor {spare} is not open"):
        udskit.listen(f"fd:{spare}")


# -- TCP ------------------------------------------------------------------------------------


def test_tcp_port_in_use() -> None:
    with udskit.listen("tcp:127.0.0.1:0") as first:
        port = first.socket.getsockname()[1]
        with pytest.raises(AddressInUse, match=f"cannot bind tcp:127.0.0.1:{port}"):
            udskit.listen(f"tcp:127.0.0.1:{port}")


def test_a_tcp_listener_on_port_0_reports_the_port_it_got() -> None:
    with udskit.listen("tcp:127.0.0.1:0") as listener:
        port = listener.socket.getsockname()[1]
        assert listener.address == udskit.Address("tcp", host="127.0.0.1", port=port)
        with socket.create_connection(("127.0.0.1", listener.address.port), timeout=PATIENCE):
            listener.settimeout(PATIENCE)
            listener.accept().close()


@pytest.mark.parametrize(
    ("address", "options", "message"),
    [
        ("tcp:127.0.0.1:0", {"owner": 0}, r"owner= sets the owner of a socket file, .* a TCP port"),
        ("tcp:127.0.0.1:0", {"group": 0}, r"group= sets the owner .* listen on a socket file"),
        ("@udskit-no-file", {"owner": 0}, r"owner= .* an abstract name, with no file; pass allow="),
        ("@udskit-no-file", {"group": "root"}, r"group= .* an abstract name"),
        (
            "tcp:127.0.0.1:0",
            {"allow": udskit.Policy.same_user_only()},
            "TCP clients carry no credentials",
        ),
    ],
)
def test_options_that_need_a_socket_file_are_refused_without_one(
    address: str, options: dict[str, object], message: str
) -> None:
    """An owner for a file that does not exist, or a policy on clients without credentials,
    would be silently ignored: the caller who asked for it believes access is restricted."""
    with pytest.raises(ValueError, match=message):
        udskit.listen(address, **options)  # type: ignore[call-overload]


def test_tcp_takes_stream_only() -> None:
    with pytest.raises(ValueError, match="TCP addresses take type='stream' only"):
        udskit.listen("tcp:127.0.0.1:0", type="dgram")


def test_tcp_address_not_on_this_host() -> None:
    with pytest.raises(SocketFileError, match=r"(?i)cannot assign requested address") as caught:
        udskit.listen("tcp:192.0.2.1:0")  # TEST-NET-1: never a local address
    assert caught.value.errno == errno.EADDRNOTAVAIL


# -- datagram senders ---------------------------------------------------------------------


def test_datagram_from_an_autobound_sender_can_be_answered(path: Path) -> None:
    with (
        udskit.listen(path, type="dgram") as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw,
    ):
        raw.bind("")  # Linux autobind: a random abstract name
        raw.sendto(b"who am I?", os.fspath(path))
        datagram = listener.recv()
        assert datagram.sender is not None
        assert datagram.sender.kind == "abstract"
        assert datagram.sender.raw == raw.getsockname()[1:]
        listener.send_to(datagram.sender, b"an abstract name")
        assert raw.recv(100) == b"an abstract name"


def test_datagram_from_an_unbound_sender_has_no_address(path: Path) -> None:
    with (
        udskit.listen(path, type="dgram") as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw,
    ):
        raw.sendto(b"anonymous", os.fspath(path))
        datagram = listener.recv()
        assert (datagram.data, datagram.sender) == (b"anonymous", None)
        assert datagram.peer.pid == os.getpid()


def test_datagram_session_closes_descriptors_nobody_read(path: Path) -> None:
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram") as client,
    ):
        read_end, write_end = os.pipe()
        try:
            before = open_fds()
            client.send_fds(b"with fds", [read_end, write_end])
            datagram = listener.recv()
            assert len(datagram.fds) == 2
            with listener.session(datagram):
                pass  # a handler that ignores the message
            assert open_fds() == before
        finally:
            os.close(read_end)
            os.close(write_end)


def test_a_datagrams_descriptors_pass_to_one_session_only(path: Path) -> None:
    """A second session() of a datagram with descriptors is refused: both sessions owned
    them, and the second closed (or handed on) what the first had closed already. A
    datagram without descriptors makes as many sessions as asked (each answers its sender)."""
    read_end, write_end = os.pipe()
    try:
        with (
            udskit.listen(path, type="dgram") as listener,
            udskit.connect(path, type="dgram", timeout=PATIENCE) as client,
        ):
            listener.settimeout(PATIENCE)
            client.send_fds(b"with fds", [read_end])
            datagram = listener.recv()
            with listener.session(datagram) as first:
                with pytest.raises(
                    RuntimeError, match=r"^session\(datagram\): the datagram's descriptors "
                ):
                    listener.session(datagram)
                data, fds = first.recv_fds()
                assert data == b"with fds"
                assert len(fds) == 1
                os.close(fds[0])
            client.send(b"no fds")
            plain = listener.recv()
            for _ in range(2):
                with listener.session(plain) as session:
                    session.send(session.recv())
                assert client.recv() == b"no fds"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_two_threads_making_sessions_of_one_datagram_give_its_descriptors_to_one(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """session() checks and marks a datagram's descriptors as passed in one step: a second
    thread's session() that comes while the first is between the two is refused once the
    first is done, not handed the same descriptors."""
    read_end, write_end = os.pipe()
    outcome: list[object] = []
    checking = listening.descriptors

    def second_thread_comes_now(*args: Any) -> list[int]:
        def second() -> None:
            try:
                outcome.append(listener.session(datagram))
            except RuntimeError as exc:
                outcome.append(exc)

        other = threading.Thread(target=second)
        other.start()
        other.join(0.2)  # it would be done by now without the lock; blocked with it
        threads.append(other)
        return checking(*args)

    threads: list[threading.Thread] = []
    try:
        with (
            udskit.listen(path, type="dgram") as listener,
            udskit.connect(path, type="dgram", timeout=PATIENCE) as client,
        ):
            listener.settimeout(PATIENCE)
            client.send_fds(b"with fds", [read_end])
            datagram = listener.recv()
            monkeypatch.setattr(listening, "descriptors", second_thread_comes_now)
            with listener.session(datagram) as first:
                monkeypatch.setattr(listening, "descriptors", checking)
                threads[0].join(PATIENCE)
                assert len(outcome) == 1
                assert isinstance(outcome[0], RuntimeError), "both sessions own the fds"
                data, fds = first.recv_fds()
                assert data == b"with fds"
                os.close(fds[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_session_refuses_a_datagram_whose_descriptors_were_closed(path: Path) -> None:
    """session() takes the datagram's descriptors over; one the caller closed already is
    refused by number, instead of being closed again by the session (by then, perhaps,
    another file's number)."""
    read_end, write_end = os.pipe()
    try:
        with (
            udskit.listen(path, type="dgram") as listener,
            udskit.connect(path, type="dgram", timeout=PATIENCE) as client,
        ):
            listener.settimeout(PATIENCE)
            client.send_fds(b"with fds", [read_end])
            datagram = listener.recv()
            (fd,) = datagram.fds
            os.close(fd)
            with pytest.raises(ValueError, match=rf"^session\(datagram\): descriptor {fd} "):
                listener.session(datagram)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_settimeout_on_a_closed_listener_says_it_is_closed(
    path: Path, kind: str, timeout: float | None
) -> None:
    listener = udskit.listen(path, type=kind)
    listener.close()
    with pytest.raises(ConnectionClosed, match="is closed"):
        listener.settimeout(timeout)  # not the closed socket's EBADF


class _ClosedBeforeSend(socket.socket):
    """A listener's socket that another thread closes just before a reply goes out."""

    listener: DatagramListener

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        self.listener.close()
        return super().sendmsg(*args, **kwargs)


def test_a_reply_from_a_listener_closed_meanwhile_says_it_is_closed(path: Path) -> None:
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram", bind=path.with_name("client.sock")) as client,
    ):
        real = listener._sock
        sock = _ClosedBeforeSend(real.family, real.type, fileno=real.detach())
        sock.listener = listener
        listener._sock = sock  # type: ignore[misc]
        client.send(b"ping")
        datagram = listener.recv()
        with pytest.raises(ConnectionClosed, match="is closed"):
            listener.send_to(datagram.sender, b"pong")  # not the closed socket's EBADF


class _ClosedAfterRead(socket.socket):
    """A listener's socket whose read returns a datagram just as another thread closes the
    listener."""

    listener: DatagramListener

    def recvmsg_into(
        self, *args: object, **kwargs: object
    ) -> tuple[int, list[tuple[int, int, bytes]], int, object]:  # type: ignore[override]
        got = super().recvmsg_into(*args, **kwargs)  # type: ignore[arg-type]
        self.listener.close()
        return got


def test_a_datagram_read_as_the_listener_closes_leaves_no_descriptor(path: Path) -> None:
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram") as client,
    ):
        real = listener._sock
        sock = _ClosedAfterRead(real.family, real.type, fileno=real.detach())
        sock.listener = listener
        listener._sock = sock  # type: ignore[misc]
        read_end, write_end = os.pipe()
        try:
            before = open_fds()
            client.send_fds(b"with fds", [read_end, write_end])
            with pytest.raises(ConnectionClosed, match="is closed"):
                listener.recv()
            assert not open_fds() - before  # (the listener's own are gone)
        finally:
            os.close(read_end)
            os.close(write_end)


# -- options and owners ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "bogus"}, "unknown socket type 'bogus'"),
        ({"backlog": 0}, "backlog must be a positive integer"),
        ({"mode": 0o10000}, "mode must be a permission number"),
        ({"mode": "0600"}, "mode must be a permission number"),
        ({"max_fds": 300}, "max_fds must be from 0 to 253"),
        ({"framing": "csv"}, "unknown framing 'csv'"),
        ({"max_frame": 0}, "max_frame must be a positive number"),
        ({"owner": -5}, "owner must be a user name or uid"),
        ({"group": ""}, "group must be a group name or gid"),
    ],
)
def test_bad_options_are_refused_before_anything_exists(
    path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        udskit.listen(path, **options)  # type: ignore[call-overload]
    assert not path.exists()


def test_resolve_owner_names_who_is_there(path: Path) -> None:
    with udskit.listen(path):
        assert resolve_owner(os.fspath(path), 0) == f"pid {os.getpid()}, uid {os.getuid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(os.fspath(path))
    try:
        assert resolve_owner(os.fspath(path), 1234) == "uid 1234"
        assert resolve_owner(os.fspath(path), None) == "an unknown process"
    finally:
        path.unlink()
