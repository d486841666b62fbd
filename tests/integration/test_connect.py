"""``connect()``: why a connect failed, in words; a client's own path (``bind=``, S7); the
datagram client's private reply path; ``expect_uid``; ``fd:N`` and ``tcp:`` targets."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import (
    AddressError,
    AddressInUse,
    ConnectError,
    PeerRejected,
    ProtocolError,
    SocketFileError,
)
from udskit.address import MAX_DIRECT_PATH

from ..conftest import open_fds
from .children import NOBODY, needs_root, run_in_child


@pytest.fixture(autouse=True)
def _no_leaks(no_fd_leak: None) -> None:
    """Every connect test, failing ones included, leaves no descriptor open."""


@pytest.fixture
def runtime_dir(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where datagram clients make their private reply directories."""
    runtime = sockdir / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    yield runtime
    assert os.listdir(runtime) == [], "a datagram client left its reply directory behind"


# -- why it failed ---------------------------------------------------------------------------


def _connect_error(target: object, **options: object) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        udskit.connect(target, **options)  # type: ignore[arg-type]
    error = caught.value
    assert isinstance(error, ConnectionError)
    assert isinstance(error.__cause__, OSError), "the OS error is chained"
    assert str(error).startswith(f"cannot connect to {target}: ")
    return error


def test_nothing_at_the_path(sockdir: Path) -> None:
    error = _connect_error(sockdir / "absent.sock")
    assert "no such file; is the server running" in str(error)
    assert error.errno == errno.ENOENT


@pytest.mark.parametrize("kind", ["stream", "dgram"])
@pytest.mark.parametrize("name", ["absent.sock", "./absent.sock"])
def test_nothing_at_a_relative_path(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, name: str
) -> None:
    # it read "directory DIR was not there; try again" of the current directory
    monkeypatch.chdir(sockdir)
    error = _connect_error(name, type=kind)
    assert str(error) == (
        f"cannot connect to {name}: no such file; is the server running, and is the path right?"
    )


def test_missing_directory(sockdir: Path) -> None:
    error = _connect_error(sockdir / "gone" / "deeper" / "app.sock")
    assert f"directory {sockdir / 'gone'} does not exist" in str(error)


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_tilde_is_not_a_directory_to_create(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # Python never expands ~: the advice was to create a directory named ~.
    monkeypatch.chdir(sockdir)
    monkeypatch.setenv("HOME", str(sockdir / "home"))
    advice = (
        f"there is no directory {sockdir}/~: '~' is expanded only by a shell, not within "
        f"quotes nor in Python (os.path.expanduser()): write {sockdir}/home in place of ~"
    )
    with pytest.raises(udskit.ConnectError) as connecting:
        udskit.connect("~/app.sock", type=kind)
    assert str(connecting.value) == f"cannot connect to ~/app.sock: {advice}"
    with pytest.raises(udskit.SocketFileError) as listening:
        udskit.listen("~/app.sock", type=kind)
    assert str(listening.value) == f"cannot create socket {sockdir}/~/app.sock: {advice}"
    assert os.listdir(sockdir) == []


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_symlink_that_leads_nowhere_is_named(sockdir: Path, kind: str) -> None:
    # it read "no such file" of a name that ls shows
    link = sockdir / "app.sock"
    link.symlink_to(sockdir / "gone" / "real.sock")
    with pytest.raises(udskit.ConnectError) as caught:
        udskit.connect(link, type=kind)
    assert str(caught.value) == (
        f"cannot connect to {link}: {link} is a symlink to {sockdir}/gone/real.sock, which "
        "leads to no file; is the server running, and does the link point where it serves?"
    )
    assert link.is_symlink()


def test_a_file_on_the_way(sockdir: Path) -> None:
    (sockdir / "file").write_text("")
    error = _connect_error(sockdir / "file" / "app.sock")
    assert f"{sockdir / 'file'} is a regular file, not a directory; check the path" in str(error)
    assert error.errno == errno.ENOTDIR


def test_stale_socket(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
    error = _connect_error(path)
    assert "the socket file exists but nothing is listening" in str(error)
    assert error.errno == errno.ECONNREFUSED


@pytest.mark.parametrize("what", ["regular file", "FIFO"])
def test_not_a_socket(sockdir: Path, what: str) -> None:
    path = sockdir / "thing"
    if what == "FIFO":
        os.mkfifo(path)
    else:
        path.write_text("")
    error = _connect_error(path)
    assert f"{path} is not a socket (it is a {what})" in str(error)


#: A datagram client's error: telling stream from seqpacket would take a connection that
#: the server accepts.
BY_CONNECTING = "(stream or seqpacket, not dgram); pass type='stream' or type='seqpacket'"


@pytest.mark.parametrize(
    ("server", "client", "told"),
    [
        ("seqpacket", "stream", "(seqpacket, not stream); pass type='seqpacket'"),
        ("dgram", "stream", "(dgram, not stream); pass type='dgram'"),
        ("stream", "seqpacket", "(stream, not seqpacket); pass type='stream'"),
        ("dgram", "seqpacket", "(dgram, not seqpacket); pass type='dgram'"),
        ("stream", "dgram", BY_CONNECTING),
        ("seqpacket", "dgram", BY_CONNECTING),
    ],
)
def test_socket_of_another_type_names_the_type_to_pass(
    sockdir: Path, server: str, client: str, told: str
) -> None:
    path = sockdir / "app.sock"
    with udskit.listen(path, type=server) as listener:  # type: ignore[call-overload]
        error = _connect_error(path, type=client)
        if server != "dgram":
            listener.socket.setblocking(False)
            with pytest.raises(BlockingIOError):  # finding the type reached no server
                listener.socket.accept()
    assert str(error) == f"cannot connect to {path}: it is a socket of another type {told}"
    assert error.errno == errno.EPROTOTYPE


def test_backlog_full(sockdir: Path) -> None:
    path = sockdir / "busy.sock"
    queued: list[socket.socket] = []
    with udskit.listen(path, backlog=1):
        try:
            for _ in range(16):  # bounded; the kernel queues backlog + 1
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                queued.append(client)
                if client.connect_ex(os.fspath(path)) == errno.EAGAIN:
                    break
            error = _connect_error(path, timeout=0)  # 0: no waiting for room
            with pytest.raises(udskit.Timeout) as waited:
                udskit.connect(path, timeout=0.2)  # waits for room, then gives up
        finally:
            for client in queued:
                client.close()
    assert "backlog is full" in str(error)
    assert error.errno == errno.EAGAIN
    assert "backlog stayed full for 0.2 s" in str(waited.value)
    assert isinstance(waited.value.__cause__, BlockingIOError), "the OS error is chained"


def _abstract() -> str:
    return f"@udskit-test-{os.getpid()}-{secrets.token_hex(4)}"


def test_abstract_name_nobody_listens_on() -> None:
    name = _abstract()
    error = _connect_error(name)
    assert "nothing listens on that abstract name" in str(error)


@needs_root
def test_permission_denied(sockdir: Path) -> None:
    sockdir.chmod(0o755)
    path = sockdir / "private.sock"
    with udskit.listen(path, mode=0o600):

        def attempt() -> str:
            udskit.connect(path)
            return "connected"

        report = run_in_child(attempt, as_user=NOBODY)
    assert report.startswith(f"ConnectError: cannot connect to {path}: permission denied")
    assert f"udskit doctor {path}" in report


# -- expect_uid -----------------------------------------------------------------------------


def test_expect_uid(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener:
        with udskit.connect(path, expect_uid=os.getuid()) as client:
            assert client.peer is not None
        listener.accept().close()
        wrong = os.getuid() + 4242
        with pytest.raises(PeerRejected) as caught:
            udskit.connect(path, expect_uid=wrong)
        message = str(caught.value)
        assert f"served by uid {os.getuid()} (pid {os.getpid()})" in message
        assert f"not the expected uid {wrong}" in message
        assert isinstance(caught.value, PermissionError)
        # The refused connection was closed on our side: the server sees it end at once.
        with listener.accept() as server, pytest.raises(udskit.ConnectionClosed):
            server.recv()


# -- a client's own path (S7) ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_bind_gives_the_server_our_address(sockdir: Path, kind: str) -> None:
    path, own = sockdir / "server.sock", sockdir / "client.sock"
    with udskit.listen(path, type=kind) as listener:
        assert isinstance(listener, udskit.Listener)
        with udskit.connect(path, type=kind, bind=own) as client:
            assert stat.S_IMODE(os.lstat(own).st_mode) == 0o600
            with listener.accept() as server:
                assert server.address == udskit.Address.parse(own)
                client.send(b"who am I?")
                assert server.recv() == b"who am I?"
        assert not own.exists(), "the client removes its own path on close"


def test_bind_to_a_live_path_is_address_in_use(sockdir: Path) -> None:
    path, own = sockdir / "server.sock", sockdir / "client.sock"
    with udskit.listen(path), udskit.listen(own, type="dgram"):
        with pytest.raises(AddressInUse, match=f"cannot bind to {own}: a live server"):
            udskit.connect(path, bind=own)
        assert own.exists()


def test_bind_to_a_non_socket_is_refused(sockdir: Path) -> None:
    path, own = sockdir / "server.sock", sockdir / "client.txt"
    own.write_text("keep me")
    refused = f"cannot bind to {own}: a regular file is in the way"  # a client does not listen
    with udskit.listen(path), pytest.raises(SocketFileError, match=refused):
        udskit.connect(path, bind=own)
    assert own.read_text() == "keep me"


def test_bind_reclaims_a_stale_path(sockdir: Path) -> None:
    path, own = sockdir / "server.sock", sockdir / "client.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(own))
    with udskit.listen(path, type="dgram") as listener:
        with udskit.connect(path, type="dgram", bind=own) as client:
            client.send(b"hi")
            datagram = listener.recv()
            assert datagram.sender == udskit.Address.parse(own)
            listener.send_to(own, b"hello")
            assert client.recv() == b"hello"
        assert not own.exists()


def test_bind_an_abstract_name(sockdir: Path) -> None:
    path, name = sockdir / "server.sock", _abstract()
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram", bind=name) as client,
    ):
        client.send(b"hi")
        datagram = listener.recv()
        assert str(datagram.sender) == name
        listener.send_to(datagram.sender, b"hello")  # type: ignore[arg-type]
        assert client.recv() == b"hello"


def test_bind_must_be_a_unix_address(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="bind= takes a Unix path or @name"):
        udskit.connect(sockdir / "server.sock", bind="tcp:127.0.0.1:9")


def test_datagram_reply_path_over_sun_path_is_refused(sockdir: Path) -> None:
    # Bound through /proc/self/fd/N, the name a server would answer means something else in
    # the server's process; the client must hear that now, not lose every reply.
    directory = sockdir / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    own = directory / "client.sock"
    server = sockdir / "server.sock"
    with udskit.listen(server, type="dgram"), pytest.raises(AddressError) as caught:
        udskit.connect(server, type="dgram", bind=own)
    message = str(caught.value)
    assert str(own) in message
    assert f"{len(os.fsencode(own))} bytes" in message
    assert f"sun_path holds {MAX_DIRECT_PATH}" in message
    assert os.listdir(directory) == []


# -- the datagram client's private reply path ----------------------------------------------


def test_datagram_client_reply_path_is_private_and_removed(
    sockdir: Path, runtime_dir: Path
) -> None:
    with udskit.listen(sockdir / "server.sock", type="dgram") as listener:
        client = udskit.connect(sockdir / "server.sock", type="dgram")
        (private,) = os.listdir(runtime_dir)
        reply_dir = runtime_dir / private
        assert stat.S_IMODE(os.lstat(reply_dir).st_mode) == 0o700
        (reply,) = os.listdir(reply_dir)
        assert stat.S_IMODE(os.lstat(reply_dir / reply).st_mode) == 0o600
        client.send(b"ping")
        datagram = listener.recv()
        assert datagram.sender == udskit.Address.parse(reply_dir / reply)
        listener.send_to(datagram.sender, b"pong")
        assert client.recv() == b"pong"
        assert client.peer == udskit.PeerCred(os.getpid(), os.getuid(), os.getgid())
        client.close()
    # runtime_dir's teardown checks the private directory is gone


def test_datagram_client_cleans_up_when_connect_fails(sockdir: Path, runtime_dir: Path) -> None:
    with pytest.raises(ConnectError, match="no such file"):
        udskit.connect(sockdir / "absent.sock", type="dgram")


def test_unusable_runtime_dir_falls_back_to_the_temp_dir(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sockdir / "does-not-exist"))
    with udskit.listen(sockdir / "server.sock", type="dgram"):
        with udskit.connect(sockdir / "server.sock", type="dgram") as client:
            name = client.socket.getsockname()
            assert os.path.dirname(os.path.dirname(name)) == tempfile.gettempdir()
        assert not os.path.exists(os.path.dirname(name))


# -- other targets and options ------------------------------------------------------------


def test_connect_to_an_inherited_descriptor() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, udskit.connect(f"fd:{right.detach()}") as adopted:
        assert adopted.peer == udskit.PeerCred(os.getpid(), os.getuid(), os.getgid())
        left.sendall(b"\0\0\0\x02hi")
        assert adopted.recv() == b"hi"


def test_connect_to_a_descriptor_that_is_not_a_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(SocketFileError, match=f"descriptor {read_end} is not an open socket"):
            udskit.connect(f"fd:{read_end}")
        os.fstat(read_end)  # still ours, still open
    finally:
        os.close(read_end)
        os.close(write_end)


def test_connect_to_a_closed_descriptor() -> None:
    spare = max(open_fds()) + 100
    with pytest.raises(SocketFileError, match=f"descriptor {spare} is not an open socket"):
        udskit.connect(f"fd:{spare}")


def test_tcp_round_trip() -> None:
    with udskit.listen("tcp:127.0.0.1:0") as listener:
        port = listener.socket.getsockname()[1]
        with udskit.connect(f"tcp:127.0.0.1:{port}", timeout=5) as client:
            assert client.peer is None
            with listener.accept() as server:
                assert server.peer is None
                client.send(b"over tcp")
                assert server.recv() == b"over tcp"
            with pytest.raises(ProtocolError, match="only be passed over Unix sockets"):
                client.send_fds(b"x", [0])


def test_tcp_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connecting is refused
        with pytest.raises(ConnectError, match=f"cannot connect to tcp:127.0.0.1:{port}"):
            udskit.connect(f"tcp:127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "bogus"}, "unknown socket type 'bogus'"),
        ({"framing": "xml"}, "unknown framing 'xml'"),
        ({"max_fds": 254}, "max_fds must be from 0 to 253"),
        ({"max_frame": 0}, "max_frame must be a positive number"),
        ({"timeout": -1}, "timeout must be None or >= 0"),
    ],
)
def test_bad_options_are_refused_before_connecting(
    sockdir: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        udskit.connect(sockdir / "absent.sock", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "what"),
    [("/dev/null", "device"), ("{sockdir}", "directory")],
)
def test_connect_to_something_else(sockdir: Path, target: str, what: str) -> None:
    path = target.format(sockdir=sockdir)
    error = _connect_error(path)
    assert f"{path} is not a socket (it is a {what})" in str(error)


def test_a_path_component_over_name_max(sockdir: Path) -> None:
    long_dir = sockdir / ("d" * 300)
    with pytest.raises(ConnectError, match="file name too long"):
        udskit.connect(long_dir / "app.sock")
    with pytest.raises(SocketFileError, match=f"cannot open directory {long_dir}") as caught:
        udskit.listen(long_dir / "app.sock")
    assert caught.value.errno == errno.ENAMETOOLONG
