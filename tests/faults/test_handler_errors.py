"""A handler that raises does not stop the server: the error is logged, that client's
connection (or datagram) ends, and the next client is served."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Channel, ConnectionClosed, FrameTooLarge, Server

#: How long a test waits for a reply or for the server thread.
PATIENCE = 20.0


def fragile(channel: Channel) -> None:
    """Echo, except on the messages that make it fail in each of the ways a handler can."""
    for message in channel:
        if message == b"boom":
            raise ValueError("the handler broke")
        if message == b"too big":
            raise FrameTooLarge("the handler's own protocol error")
        if message == b"hang up":
            raise ConnectionClosed("the handler saw its peer go")
        channel.send(message)


@pytest.fixture(params=["stream", "seqpacket", "dgram"])
def server(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[Server]:
    server = Server(sockdir / "app.sock", fragile, type=request.param)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server
    server.stop()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    assert not (sockdir / "app.sock").exists()


def _ask(server: Server, message: bytes) -> bytes | None:
    """Send ``message`` as a new client; the reply, or None if the server closed on us."""
    kind = server.listener.type
    with udskit.connect(str(server.address), type=kind, timeout=PATIENCE) as client:
        client.send(message)
        if kind == "dgram":
            client.send(b"ping")  # a failed datagram gets no reply: the next one proves it
            reply = client.recv()
            return None if reply == b"ping" else reply
        try:
            return client.recv()
        except ConnectionClosed:
            return None


def test_handler_exception_is_logged_and_the_server_goes_on(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="udskit"):
        assert _ask(server, b"boom") is None
        assert _ask(server, b"after the boom") == b"after the boom"
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[0] is ValueError


def test_handler_udskit_error_is_a_warning(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="udskit"):
        assert _ask(server, b"too big") is None
        assert _ask(server, b"next") == b"next"
    warnings = [r for r in caplog.records if "the handler's own protocol error" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert warnings[0].exc_info is None, "an expected error gets one line, no traceback"


def test_peer_gone_in_a_handler_is_only_debug(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="udskit"):
        assert _ask(server, b"hang up") is None
        assert _ask(server, b"next") == b"next"
    records = [r for r in caplog.records if "the handler saw its peer go" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.DEBUG]
