"""A message server's outbox stays bounded when a client's requests ask for much more than
they weigh, and every reply still arrives, whole and in order, once the client reads."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import udskit
import udskit.serving

#: Small socket buffers and a small outbox, so that a few hundred requests overfill them.
BUFFER = 32 * 1024
MAX_OUTBOX = 64 * 1024
#: Each reply is this many times its request.
GROWTH = 1000


@contextmanager
def serving(path: Path, **options: object) -> Iterator[udskit.MessageServer]:
    server = udskit.MessageServer(path, lambda conn, message: message * GROWTH, **options)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_every_reply_arrives_in_order_through_a_small_outbox(sockdir: Path, kind: str) -> None:
    path = sockdir / "s"
    options = {"type": kind, "sndbuf": BUFFER, "rcvbuf": BUFFER}
    with (
        serving(path, max_outbox=MAX_OUTBOX, **options),
        udskit.connect(path, timeout=10, **options) as channel,  # type: ignore[arg-type]
    ):
        messages = [b"%09d!" % number for number in range(2000)]
        sender = threading.Thread(target=channel.send_many, args=(messages,))
        sender.start()
        for number, message in enumerate(messages):
            assert channel.recv() == message * GROWTH, number
        sender.join()


def test_a_client_that_does_not_read_holds_a_bounded_outbox(sockdir: Path) -> None:
    path = sockdir / "s"
    conns: list[udskit.Connection] = []
    with serving(
        path, max_outbox=MAX_OUTBOX, on_connect=conns.append, sndbuf=BUFFER, rcvbuf=BUFFER
    ):
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(str(path))
        idle.setblocking(False)
        request = struct.pack(">I", 10) + b"0123456789"
        sent = 0
        try:
            while sent < 100_000:  # until the server stops reading it and our buffer fills
                idle.send(request)
                sent += 1
        except BlockingIOError:
            pass
        # Another client is served meanwhile; once its reply is back, the idle client's
        # requests have been read as far as the server reads them.
        with udskit.connect(path, timeout=10) as other:
            other.send(b"x")
            assert other.recv() == b"x" * GROWTH
        held = conns[0].outbox_size
        assert held <= MAX_OUTBOX + 10 * GROWTH, (held, sent)
        idle.close()


def test_a_datagram_receiver_that_never_reads_delays_nobody_else(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its replies wait in their own queue (the serving thread never sleeps on them) and
    are dropped once it has taken nothing for a while; another sender is answered at once."""
    monkeypatch.setattr(udskit.serving, "DATAGRAM_REPLY_WAIT", 0.05)
    path = sockdir / "s"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(sockdir / "stuck"))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(10)
    with (
        caplog.at_level("WARNING", logger="udskit"),
        serving(path, type="dgram") as server,
        stuck,
        udskit.connect(path, type="dgram", timeout=10) as other,
    ):
        for number in range(50):  # far more than its queue holds
            stuck.sendto(b"m%02d" % number, str(path))
        other.send(b"x")
        assert other.recv() == b"x" * GROWTH
        # Bounded: every waiting reply is sent or dropped within a few retries.
        for _ in range(10_000):
            if server._unsent is not None and not server._unsent:
                break
            other.send(b"y")
            assert other.recv() == b"y" * GROWTH
    assert "replies dropped" in caplog.text
