"""What the blocking Channel offers beyond the conformance contract: half-close, its
properties and repr, and argument checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import udskit
from udskit import ConnectionClosed, Listener


@pytest.fixture(autouse=True)
def _no_leaks(no_fd_leak: None) -> None:
    """Every channel test leaves no descriptor open."""


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_shutdown_write_is_a_half_close(kind: str) -> None:
    ours, theirs = udskit.pair(kind)
    with ours, theirs:
        ours.send(b"last words")
        ours.shutdown_write()
        # Our own doing, said so: the kernel's EPIPE would blame the peer.
        for late in (
            lambda: ours.send(b"too late"),
            lambda: ours.send_many([b"too", b"late"]),
            lambda: ours.send_fds(b"too late", [0]),
        ):
            with pytest.raises(ConnectionClosed, match=r"sending side was shut down \(shutdown_"):
                late()
        assert list(theirs) == [b"last words"]  # they see the end of our stream...
        theirs.send(b"but may still answer")  # ...and the other direction stays open
        assert ours.recv() == b"but may still answer"
        theirs.close()
        with pytest.raises(ConnectionClosed):
            ours.recv()
    with pytest.raises(ConnectionClosed, match="this channel is closed"):
        ours.shutdown_write()


def test_properties_and_repr(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with udskit.listen(path, framing="lines") as listener:
        assert isinstance(listener, Listener)
        with udskit.connect(path, framing="lines") as client, listener.accept() as server:
            assert client.type == "stream"
            assert client.framing == "lines"
            assert client.address == udskit.Address.parse(path)
            assert server.address is None  # an unbound client has no name
            assert client.fileno() == client.socket.fileno() >= 0
            open_before = not client.closed
            text = repr(client)
            assert text.startswith(f"<Channel stream {path} peer=(pid={os.getpid()} ")
            assert text.endswith(f"fd={client.fileno()}>")
    assert open_before
    assert client.closed
    assert repr(client).endswith(" closed>")
    dgram, other = udskit.pair("dgram")
    with dgram, other:
        assert dgram.framing is None
        assert repr(dgram).startswith("<Channel dgram unnamed peer=(pid=")


def test_settimeout_refuses_negative_values() -> None:
    ours, theirs = udskit.pair()
    with ours, theirs, pytest.raises(ValueError, match="timeout must be None or >= 0"):
        ours.settimeout(-0.5)


@pytest.mark.parametrize("timeout", [None, 0.0, 5.0])
@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_settimeout_on_a_closed_channel_says_it_is_closed(kind: str, timeout: float | None) -> None:
    # As every other call does (another thread may close the channel as this is called),
    # never the closed socket's EBADF, nor success one time in three.
    ours, theirs = udskit.pair(kind)
    with theirs:
        ours.settimeout(1.0)
        ours.close()
        with pytest.raises(ConnectionClosed, match="this channel is closed"):
            ours.settimeout(timeout)


def test_zero_timeout_means_do_not_wait() -> None:
    ours, theirs = udskit.pair("seqpacket")
    with ours, theirs:
        theirs.settimeout(0)
        with pytest.raises(udskit.Timeout):
            theirs.recv()
        ours.send(b"now")
        assert theirs.recv() == b"now"
