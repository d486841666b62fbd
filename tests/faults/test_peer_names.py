"""A client's own socket name, as accept() or recvfrom() report it, is what the client bound:
any bytes it chose, relative to its own directory. It names the client and nothing else:
never parsed as an address string (where ``unix:/other``, ``@name``, ``fd:3`` or
``zz:x`` would mean something else, or nothing), and never the reason a server stops."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

import udskit
import udskit.aio
from udskit.address import Address

#: Upper bound of every wait here.
PATIENCE = 10.0

#: Names a client may bind relative to its directory that read as other addresses.
TRICKY = ["zz:x", "fd:3", "fd:listen", "unix:/tmp/elsewhere", "@abstract", "tcp:h:1"]


def _bound_client(kind: int, name: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, kind)
    if name.startswith("unix:"):
        os.makedirs(os.path.dirname(name), exist_ok=True)
    client.bind(name)
    return client


@pytest.mark.parametrize("name", TRICKY)
def test_a_message_server_serves_a_client_whatever_name_it_bound(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(sockdir)
    path = str(sockdir / "s")
    seen: list[Address | None] = []

    def handler(conn: udskit.Connection, message: bytes) -> bytes:
        seen.append(conn.remote)
        return message

    server = udskit.MessageServer(path, handler)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        with _bound_client(socket.SOCK_STREAM, name) as raw:
            raw.settimeout(PATIENCE)
            raw.connect(path)
            raw.sendall(b"\0\0\0\2hi")
            assert raw.recv(16) == b"\0\0\0\2hi"
        # and the server is still there for the next client
        with udskit.connect(path, framing="length", timeout=PATIENCE) as client:
            client.send(b"next")
            assert client.recv() == b"next"
    finally:
        server.stop()
        runner.join(PATIENCE)
        server.close()
    assert not runner.is_alive()
    assert seen[0] == Address("path", os.fsencode(name))


@pytest.mark.parametrize("name", TRICKY)
def test_a_listener_accepts_a_client_whatever_name_it_bound(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(sockdir)
    with udskit.listen(str(sockdir / "s"), framing="length") as listener:
        listener.settimeout(PATIENCE)
        with _bound_client(socket.SOCK_STREAM, name) as raw:
            raw.connect(str(sockdir / "s"))
            with listener.accept() as channel:
                assert channel.address == Address("path", os.fsencode(name))


@pytest.mark.parametrize("name", TRICKY)
def test_a_datagram_sender_is_named_by_what_it_bound(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(sockdir)
    path = str(sockdir / "d")
    with udskit.listen(path, type="dgram") as listener:
        listener.settimeout(PATIENCE)
        with _bound_client(socket.SOCK_DGRAM, name) as raw:
            raw.sendto(b"hello", path)
            datagram = listener.recv()
    assert datagram.sender == Address("path", os.fsencode(name))


def test_a_datagram_reply_goes_to_the_sender_not_to_what_its_name_spells(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sockdir)
    elsewhere = str(sockdir / "elsewhere")
    path = str(sockdir / "d")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as victim,
        udskit.listen(path, type="dgram") as listener,
    ):
        victim.bind(elsewhere)
        victim.setblocking(False)
        listener.settimeout(PATIENCE)
        # bound relative to our directory, as ./unix:/<sockdir>/elsewhere
        with _bound_client(socket.SOCK_DGRAM, "unix:" + elsewhere) as sender:
            sender.settimeout(PATIENCE)
            sender.sendto(b"ping", path)
            datagram = listener.recv()
            listener.send_to(datagram.sender, b"pong")
            assert sender.recv(16) == b"pong"
        with pytest.raises(BlockingIOError):
            victim.recv(16)


def test_errors_naming_a_peer_stay_one_line_whatever_it_bound(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name with a newline would break the one line an error is (or forge another line
    in a log): it is shown with the newline escaped."""
    monkeypatch.chdir(sockdir)
    name = "x\n0.1 forged"
    three = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))]
    with udskit.listen(str(sockdir / "s"), framing="length", max_fds=1) as listener:
        listener.settimeout(PATIENCE)
        with _bound_client(socket.SOCK_STREAM, name) as raw:
            raw.connect(str(sockdir / "s"))
            with listener.accept() as channel:
                raw.sendmsg([b"\0\0\0\3fds"], three)
                with pytest.raises(udskit.ProtocolError) as stream:
                    channel.recv()
    path = str(sockdir / "d")
    with udskit.listen(path, type="dgram", max_fds=1) as listener:
        listener.settimeout(PATIENCE)
        with _bound_client(socket.SOCK_DGRAM, name + " too") as raw:
            raw.sendmsg([b"fds"], three, 0, path)
            with pytest.raises(udskit.ProtocolError) as datagram:
                listener.recv()
    for error in (stream.value, datagram.value):
        assert "\n" not in str(error)
        assert "x\\n0.1 forged" in str(error)


def test_asyncio_errors_naming_a_peer_stay_one_line_whatever_it_bound(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, from udskit.aio: a stream channel's error and a datagram listener's."""
    monkeypatch.chdir(sockdir)
    name = "x\n0.1 forged"
    three = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))]

    async def main() -> list[BaseException]:
        errors: list[BaseException] = []
        async with await udskit.aio.listen(str(sockdir / "s"), max_fds=1) as listener:
            with _bound_client(socket.SOCK_STREAM, name) as raw:
                raw.connect(str(sockdir / "s"))
                async with await asyncio.wait_for(listener.accept(), PATIENCE) as channel:
                    raw.sendmsg([b"\0\0\0\3fds"], three)
                    with pytest.raises(udskit.ProtocolError) as stream:
                        await asyncio.wait_for(channel.recv(), PATIENCE)
                    errors.append(stream.value)
        path = str(sockdir / "d")
        async with await udskit.aio.listen(path, type="dgram", max_fds=1) as datagrams:
            with _bound_client(socket.SOCK_DGRAM, name + " too") as raw:
                raw.sendmsg([b"fds"], three, 0, path)
                with pytest.raises(udskit.ProtocolError) as datagram:
                    await asyncio.wait_for(datagrams.recv(), PATIENCE)
                errors.append(datagram.value)
        return errors

    for error in asyncio.run(main()):
        assert "\n" not in str(error)
        assert "x\\n0.1 forged" in str(error)
