"""Datagram senders' credentials (SCM_CREDENTIALS): set before the listener can receive
anything, and a datagram that carries none (pid 0, queued before SO_PASSCRED was set, as
under socket activation) is never judged or reported as a real peer's."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
import udskit.aio
from udskit import Datagram, PeerCred, Policy, Timeout
from udskit import listening as listening_module

from ..conftest import READY_TIMEOUT

#: What the kernel reports for a datagram without credentials: pid 0, and the overflow
#: uid/gid (nobody) for the ids.
OVERFLOW_UID = int(Path("/proc/sys/kernel/overflowuid").read_text())

ME = PeerCred(os.getpid(), os.getuid(), os.getgid())


@pytest.fixture
def path(sockdir: Path) -> Path:
    return sockdir / "dgram.sock"


def _send(target: str | bytes, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(data, target)


@pytest.fixture
def queued_before_passcred() -> Iterator[Callable[[Path], int]]:
    """A datagram socket bound at a path with one datagram queued before SO_PASSCRED was
    set: what systemd-socket-activate --datagram hands over. Returns its descriptor."""
    made: list[socket.socket] = []

    def make(path: Path) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        made.append(sock)
        sock.bind(os.fspath(path))
        _send(os.fspath(path), b"first")  # neither end has SO_PASSCRED: no credentials
        return sock.detach()

    yield make
    for sock in made:
        sock.close()


def _until(listener: udskit.DatagramListener) -> Datagram:
    listener.settimeout(READY_TIMEOUT)
    return listener.recv()


def test_listen_sets_passcred_before_the_socket_can_receive(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A datagram that arrives the moment the socket is bound carries our credentials."""
    real_claim = listening_module.claim

    def claim_then_send(sock: socket.socket, *args: object, **kwargs: object) -> object:
        bound = real_claim(sock, *args, **kwargs)  # type: ignore[arg-type]
        _send(os.fspath(path), b"early")  # before listen() has returned
        return bound

    monkeypatch.setattr(listening_module, "claim", claim_then_send)
    with udskit.listen(path, type="dgram") as listener:
        early = _until(listener)
    assert early.data == b"early"
    assert early.peer == ME


def test_aio_listen_sets_passcred_before_the_socket_can_receive(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_claim = listening_module.claim

    def claim_then_send(sock: socket.socket, *args: object, **kwargs: object) -> object:
        bound = real_claim(sock, *args, **kwargs)  # type: ignore[arg-type]
        _send(os.fspath(path), b"early")
        return bound

    monkeypatch.setattr(listening_module, "claim", claim_then_send)

    async def main() -> Datagram:
        async with await udskit.aio.listen(path, type="dgram") as listener:
            listener.settimeout(READY_TIMEOUT)
            return await listener.recv()

    early = asyncio.run(main())
    assert early.data == b"early"
    assert early.peer == ME


def test_a_datagram_without_credentials_has_no_peer(
    path: Path, queued_before_passcred: Callable[[Path], int]
) -> None:
    fd = queued_before_passcred(path)
    with udskit.listen(f"fd:{fd}", type="dgram") as listener:
        first = _until(listener)
        _send(os.fspath(path), b"second")
        second = _until(listener)
    assert (first.data, first.peer) == (b"first", None)
    assert (second.data, second.peer) == (b"second", ME)


@pytest.mark.parametrize("allowed", ["me", "nobody"])
def test_a_policy_never_serves_a_datagram_without_credentials(
    path: Path,
    queued_before_passcred: Callable[[Path], int],
    caplog: pytest.LogCaptureFixture,
    allowed: str,
) -> None:
    """Served neither as ours (it may not be) nor as nobody's (the overflow uid is nobody's)."""
    fd = queued_before_passcred(path)
    uid = os.getuid() if allowed == "me" else OVERFLOW_UID
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(f"fd:{fd}", type="dgram", allow=Policy(uids={uid})) as listener,
    ):
        if allowed == "me":
            _send(os.fspath(path), b"second")
            assert _until(listener).data == b"second"  # the first one was refused
        else:
            listener.settimeout(0.2)
            with pytest.raises(Timeout):
                listener.recv()  # nothing nobody sent: the first one was refused
    assert "carries no sender credentials" in caplog.text
    assert "PassCredentials=yes" in caplog.text


def test_aio_a_policy_never_serves_a_datagram_without_credentials(
    path: Path, queued_before_passcred: Callable[[Path], int], caplog: pytest.LogCaptureFixture
) -> None:
    fd = queued_before_passcred(path)

    async def main() -> Datagram:
        allow = Policy(uids={os.getuid(), OVERFLOW_UID})
        async with await udskit.aio.listen(f"fd:{fd}", type="dgram", allow=allow) as listener:
            listener.settimeout(READY_TIMEOUT)
            _send(os.fspath(path), b"second")
            return await listener.recv()

    with caplog.at_level(logging.WARNING, logger="udskit"):
        served = asyncio.run(main())
    assert (served.data, served.peer) == (b"second", ME)
    assert "carries no sender credentials" in caplog.text


#: The server systemd-socket-activate starts: it reports each datagram's peer.
_ACTIVATED = textwrap.dedent(
    """
    import sys, udskit
    uids = [int(uid) for uid in sys.argv[1].split(",") if uid != "-"]
    allow = udskit.Policy(uids=uids) if uids else None
    with udskit.listen("fd:listen", type="dgram", allow=allow) as listener:
        listener.settimeout(float(sys.argv[2]))
        print("ready", flush=True)
        for datagram in listener:
            print(datagram.data.decode(), datagram.peer and datagram.peer.uid, flush=True)
            if datagram.data == b"DONE":
                break
    """
)


@pytest.mark.parametrize("policy", ["none", "nobody", "me"])
def test_systemd_socket_activation_first_datagram(path: Path, policy: str) -> None:
    """systemd-socket-activate --datagram starts the server when the first datagram arrives:
    that one carries no credentials (the activator does not set SO_PASSCRED)."""
    activator = shutil.which("systemd-socket-activate")
    if activator is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate is missing (package systemd)")
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    me = str(os.getuid())
    allowed = {"none": "-", "nobody": f"{OVERFLOW_UID},{me}", "me": me}[policy]
    with subprocess.Popen(
        [
            activator,
            "--datagram",
            "-l",
            os.fspath(path),
            # The activator passes on no environment: point the server at this udskit.
            f"--setenv=PYTHONPATH={Path(udskit.__file__).parent.parent}",
            sys.executable,
            "-c",
            _ACTIVATED,
            allowed,
            str(READY_TIMEOUT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # _line() must leave what follows the line for communicate()
    ) as server:
        try:
            _wait_for_file(path, server)
            _send(os.fspath(path), b"first")  # starts the server
            assert _line(server) == "ready\n"
            _send(os.fspath(path), b"DONE")  # now with credentials: SO_PASSCRED is set
            out_bytes, err_bytes = server.communicate(timeout=READY_TIMEOUT)
            out, err = out_bytes.decode(), err_bytes.decode()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    lines = out.splitlines()
    if policy == "none":
        assert lines == ["first None", f"DONE {os.getuid()}"], err
    elif policy == "me":
        assert lines == [f"DONE {os.getuid()}"], err
        assert "PassCredentials=yes" in err
    else:  # the overflow uid is allowed too: still, the first is nobody's datagram
        assert lines == [f"DONE {os.getuid()}"], err
        assert "carries no sender credentials" in err


def _line(process: subprocess.Popen[bytes]) -> str:
    """The process's next line of output (bounded wait), read a byte at a time so that
    nothing after it is consumed."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], READY_TIMEOUT)
        assert ready, "the activated server said nothing in time"
        byte = os.read(fd, 1)
        assert byte, f"the activated server ended its output after {line!r}"
        line += byte
    return line.decode()


def _wait_for_file(path: Path, process: subprocess.Popen[bytes]) -> None:
    """The activator binds before it waits; poll (bounded) for its socket file."""
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "systemd-socket-activate did not bind in time"
        time.sleep(delay)  # back-off between polls, not synchronisation
        delay = min(delay * 2, 0.05)


def _one_with_and_one_without_credentials(path: Path) -> socket.socket:
    """A bound datagram socket holding two datagrams: one whose sender set SO_PASSCRED, then
    one queued while neither end had it (pid 0)."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(os.fspath(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as with_creds:
        with_creds.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with_creds.sendto(b"with", os.fspath(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as without:
        without.sendto(b"without", os.fspath(path))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return receiver


def test_a_channel_never_reports_the_previous_senders_credentials(path: Path) -> None:
    with udskit.Channel(_one_with_and_one_without_credentials(path)) as channel:
        assert channel.recv() == b"with"
        assert channel.peer is not None
        assert channel.peer.pid == os.getpid()
        assert channel.recv() == b"without"
        assert channel.peer is None


def test_an_aio_channel_never_reports_the_previous_senders_credentials(path: Path) -> None:
    async def main() -> None:
        async with udskit.aio.Channel(_one_with_and_one_without_credentials(path)) as channel:
            assert await channel.recv() == b"with"
            assert channel.peer is not None
            assert channel.peer.pid == os.getpid()
            assert await channel.recv() == b"without"
            assert channel.peer is None

    for uvloop in (False, True):
        udskit.aio.run(main(), use_uvloop=uvloop)
        path.unlink()
