"""Fuzzing the tap's decoders, its text and JSON output, and its pcap writer.

What a tap shows comes from peers it does not trust: any bytes, split anyhow, in both
directions; names a client chose (its bound address, its command name). Properties: the
decoders never raise and keep at most ``max_bytes`` of a message; each text record is one
line, whatever a peer put in it; a capture reads back as the bytes that were relayed.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
from collections.abc import Iterator

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udskit.creds import PeerCred
from udskit.tap.decode import Conversation
from udskit.tap.events import Closed, Data, Notice, Opened, Refused
from udskit.tap.pcap import PcapWriter
from udskit.tap.render import Printer

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Pieces of HTTP, good and bad, from which conversations are built.
_HTTP_PIECES = [
    b"GET / HTTP/1.1\r\n",
    b"HEAD /x HTTP/1.0\r\n",
    b"POST /p HTTP/1.1\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.0 404 \xff\xfe caf\xc3\xa9\r\n",
    b"HTTP/1.1 100 Continue\r\n",
    b"Host: h\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: x\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"\r\n",
    b"abc",
    b"3\r\nabc\r\n",
    b"0\r\n\r\n",
    b"\x00\x00\x00\x03",
    b"\n",
    b"\xff",
]

_DIRECTIONS = st.sampled_from(["up", "down"])


def _conversation_input() -> st.SearchStrategy[list[tuple[str, bytes]]]:
    piece = st.one_of(st.sampled_from(_HTTP_PIECES), st.binary(max_size=12))
    reads = st.lists(st.tuples(_DIRECTIONS, piece), max_size=12)
    # now and then one read over every limit (h11's, a line's, max_bytes)
    big = st.sampled_from([[], [], [], [("up", b"x" * 70_000)]])
    return st.tuples(reads, big).map(lambda r: r[0] + r[1])


@FUZZ
@given(
    reads=_conversation_input(),
    framing=st.sampled_from(["auto", "length", "lines", "http", "raw"]),
    max_bytes=st.sampled_from([0, 1, 16]),
)
def test_the_decoder_shows_anything_without_raising(
    reads: list[tuple[str, bytes]], framing: str, max_bytes: int
) -> None:
    conversation = Conversation(framing, max_bytes)  # type: ignore[arg-type]
    shown = []
    for direction, data in reads:
        shown.extend(conversation.feed(direction, data))  # type: ignore[arg-type]
    for direction in ("up", "down"):
        shown.extend(conversation.end(direction))  # type: ignore[arg-type]
    for item in shown:
        assert len(item.preview) <= max_bytes
        assert item.size >= 0
    relayed = sum(len(data) for _, data in reads)
    if framing == "raw":
        assert sum(item.size for item in shown) == relayed


@pytest.fixture
def named_ourselves() -> Iterator[bytes]:
    """This process's command name (``/proc/self/comm``, what the tap shows of a client) set
    to one with a newline in it, as any program may name itself; restored after."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_name = 15
    with open("/proc/self/comm", "rb") as f:
        before = f.read().rstrip(b"\n")
    name = b"x\n9.9 #9 > y"
    assert libc.prctl(pr_set_name, ctypes.c_char_p(name), 0, 0, 0) == 0
    try:
        with open("/proc/self/comm", "rb") as f:
            if f.read().rstrip(b"\n") != name:
                pytest.skip("this system does not show the command name as set")
        yield name
    finally:
        libc.prctl(pr_set_name, ctypes.c_char_p(before), 0, 0, 0)


_PEER_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["/tmp/a\n0.1 #2 > root[1] uid 0", "@x\r\ny", "a\x1b[2Jb", "\u2028", "\x85"]),
)


@FUZZ
@given(
    address=_PEER_TEXT,
    reason=_PEER_TEXT,
    notice=_PEER_TEXT,
    reads=_conversation_input(),
    framing=st.sampled_from(["auto", "http", "lines"]),
)
def test_every_text_record_is_one_line(
    address: str, reason: str, notice: str, reads: list[tuple[str, bytes]], framing: str
) -> None:
    lines: list[bytes] = []
    printer = Printer(lines.append, start=0.0, framing=framing)  # type: ignore[arg-type]
    client = PeerCred(os.getpid(), os.getuid(), os.getgid())
    printer(Opened(1, 1.0, client, address))
    for direction, data in reads:
        printer(Data(1, 1.0, direction, data))  # type: ignore[arg-type]
    printer(Closed(1, 1.0, "up", reason))
    printer(Refused(2, 1.0, client, reason))
    printer(Notice(1.0, notice))
    printer(Closed(1, 1.0, None))
    for line in lines:
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1, line
        assert b"\r" not in line, line
        assert b"\x1b" not in line, line
        text = line.decode()
        assert not any(ch in text for ch in "\u2028\u2029\x85"), line


def test_a_clients_command_name_cannot_forge_a_line(named_ourselves: bytes) -> None:
    for as_json in (False, True):
        lines: list[bytes] = []
        printer = Printer(lines.append, start=0.0, framing="lines", as_json=as_json)
        printer(Opened(1, 1.0, PeerCred(os.getpid(), os.getuid(), os.getgid())))
        printer(Data(1, 1.0, "up", b"hello\n"))
        assert len(lines) == 2
        for line in lines:
            assert line.count(b"\n") == 1, line
        if as_json:
            assert json.loads(lines[1])["command"] == named_ourselves.decode()


@FUZZ
@given(
    events=st.lists(
        st.tuples(
            st.integers(1, 3),
            _DIRECTIONS,
            st.sampled_from([b"", b"y" * 70_000]) | st.binary(min_size=1, max_size=20),
        ),
        max_size=8,
    )
)
def test_a_capture_reads_back_as_the_bytes_relayed(events: list[tuple[int, str, bytes]]) -> None:
    file = io.BytesIO()
    writer = PcapWriter(file)
    for conn in {conn for conn, _, _ in events}:
        writer(Opened(conn, 1.0, None))
    for conn, direction, data in events:
        writer(Data(conn, 1.0, direction, data))  # type: ignore[arg-type]
    writer.close()
    file.seek(0)
    got: dict[tuple[int, int], bytes] = {}
    for _, frame in dpkt.pcap.Reader(file):
        segment = dpkt.ethernet.Ethernet(frame).data.data
        key = (segment.sport, segment.dport)
        got[key] = got.get(key, b"") + bytes(segment.data)
    wanted: dict[tuple[int, int], bytes] = {}
    for conn, direction, data in events:
        port = 32768 + conn - 1
        key = (port, 80) if direction == "up" else (80, port)
        wanted[key] = wanted.get(key, b"") + data
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in wanted.items() if v}


def test_an_empty_read_is_not_the_end_of_an_http_conversation() -> None:
    conversation = Conversation("http", 16)
    assert conversation.feed("up", b"") == []
    (shown,) = conversation.feed("up", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert shown.summary == "GET / HTTP/1.1"


def test_a_reason_phrase_beyond_ascii_is_http_and_the_requests_go_on() -> None:
    """RFC 9112 allows any byte from 0x80 in a reason phrase (obs-text)."""
    conversation = Conversation("http", 32)
    conversation.feed("up", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head, body = conversation.feed(
        "down", b"HTTP/1.1 200 Gr\xfc\xdfe\r\nContent-Length: 2\r\n\r\nok"
    )
    assert head.summary == "HTTP/1.1 200 Gr\u00fc\u00dfe"
    assert (body.framing, body.preview) == ("http", b"ok")
    (again,) = conversation.feed("up", b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert again.summary == "GET /2 HTTP/1.1"
