"""The sans-IO decoders and renderers: bytes in, what is shown out, however the bytes are
split; framing errors shown as raw; the pcap writer's packets read back."""

from __future__ import annotations

import io
import itertools
import json
import sys

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from udskit import tap
from udskit.creds import PeerCred
from udskit.tap.decode import Conversation, preview_text, show_packet


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _feed_all(conversation: Conversation, pieces: list[bytes]) -> list[tap.Shown]:
    shown = []
    for piece in pieces:
        shown.extend(conversation.feed("up", piece))
    return shown + conversation.end("up")


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(0, 10_000)))
def test_length_frames_come_out_whole_however_the_bytes_are_split(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(len(p).to_bytes(4, "big") + p for p in payloads)
    shown = _feed_all(Conversation("length", 100), _split(stream, cuts))
    assert [(s.framing, s.size, s.preview) for s in shown] == [
        ("length", len(p), p[:100]) for p in payloads
    ]


@given(
    st.lists(st.text(max_size=40).map(lambda t: t.replace("\n", "")), max_size=8),
    st.lists(st.integers(0, 10_000)),
)
def test_lines_come_out_whole_however_the_bytes_are_split(
    lines: list[str], cuts: list[int]
) -> None:
    stream = "".join(line + "\n" for line in lines).encode()
    shown = _feed_all(Conversation("lines", 1000), _split(stream, cuts))
    assert [s.preview for s in shown] == [(line + "\n").encode() for line in lines]


@given(st.lists(st.integers(0, 10_000)))
def test_bytes_that_are_not_a_length_frame_are_shown_from_their_prefix_on(
    cuts: list[int],
) -> None:
    # PostgreSQL's startup packet passes for a frame, its next message ('Q', then a length
    # that counts itself) does not: every byte from that prefix on is shown, none dropped.
    stream = b"\x00\x00\x00\x02ab" + b"Q\x00\x00\x00\x0eselect 1;\x00"
    shown = _feed_all(Conversation("length", 100), _split(stream, cuts))
    assert shown[0] == tap.Shown("length", 2, b"ab")
    raw = shown[1:]
    assert raw[0].note.startswith("not a length frame: a prefix announcing 1358954496 B")
    assert b"".join(s.preview for s in raw) == stream[6:]
    assert sum(s.size for s in raw) == len(stream) - 6


def test_a_stream_ending_inside_a_frame_or_line_says_so() -> None:
    frames = Conversation("length", 10)
    assert frames.feed("up", b"\x00\x00\x00\x09abc") == []
    (cut,) = frames.end("up")
    assert (cut.size, cut.preview, cut.note) == (3, b"abc", "the stream ended inside this frame")
    lines = Conversation("lines", 10)
    assert lines.feed("up", b"no newline") == []
    (rest,) = lines.end("up")
    assert rest.note == "no newline before the end"


def test_only_max_bytes_of_a_long_message_are_kept() -> None:
    conversation = Conversation("length", 4)
    (shown,) = conversation.feed("up", (1_000_000).to_bytes(4, "big") + b"x" * 1_000_000)
    assert (shown.size, shown.preview) == (1_000_000, b"xxxx")
    assert preview_text(shown.preview, shown.size) == '"xxxx" ...(+999996 B)'


def test_http_requests_and_responses_over_keep_alive() -> None:
    conversation = Conversation("auto", 64)
    request = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    response = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    shown = conversation.feed("up", request) + conversation.feed("down", response)
    shown += conversation.feed("up", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    shown += conversation.feed("down", b"HTTP/1.1 204 No Content\r\n\r\n")
    assert conversation.framing == "http"
    assert [(s.summary, s.preview) for s in shown] == [
        ("POST /a HTTP/1.1", b""),
        ("body", b"abc"),
        ("HTTP/1.1 201 Created", b""),
        ("body", b"ok"),
        ("GET /b HTTP/1.1", b""),
        ("HTTP/1.1 204 No Content", b""),
    ]


@given(st.lists(st.integers(0, 10_000)))
def test_malformed_http_is_shown_from_the_start_of_what_breaks_however_it_was_split(
    cuts: list[int],
) -> None:
    """h11 holds a head until it is whole: the bytes of earlier reads are shown with the
    read that broke it, and the note names the fault without a Python repr."""
    conversation = Conversation("http", 200)
    (request,) = conversation.feed("up", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request.summary == "GET /a HTTP/1.1"
    (response,) = conversation.feed("down", b"HTTP/1.1 204 No Content\r\n\r\n")
    assert response.summary == "HTTP/1.1 204 No Content"
    bad = b"GET /b HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\nafter"
    raw = _feed_all(conversation, _split(bad, cuts))
    assert raw[0].note == "not HTTP/1.1 (illegal header line); shown raw from here"
    assert b"".join(s.preview for s in raw) == bad


def test_malformed_http_is_shown_raw_from_there_on() -> None:
    conversation = Conversation("http", 64)
    (shown,) = conversation.feed("up", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert shown.framing == "raw"
    assert shown.note.startswith("not HTTP/1.1 (")
    assert conversation.feed("up", b"more")[0].framing == "raw"


@pytest.mark.parametrize(
    ("first", "framing"),
    [
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"HTTP/1.1 200 OK\r\n", "http"),
        (b"\x00\x00\x00\x02hi", "length"),
        (b"hello\n", "lines"),
        (b"hello", "raw"),
        (b"\xff\xfe\x00", "raw"),
        (b"\x7f\x00\x00\x00", "raw"),
        (b"\x00AUTH EXTERNAL 30\r\n", "raw"),  # D-Bus: a NUL, then text
        (b"\x00\x00\x01\x00" + b"x" * 256, "length"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "raw"),  # PostgreSQL's SSLRequest
        (b"\x00\x00\x00\x08\x04\xd2\x16\x30", "raw"),  # and GSSENCRequest
        # A udskit frame whose first read stops 4 bytes short: its length, not PostgreSQL's
        (b"\x00\x00\x00\x0cabcdefgh", "length"),
    ],
)
def test_auto_recognises_the_framing(first: bytes, framing: str) -> None:
    conversation = Conversation("auto", 64)
    conversation.feed("up", first)
    assert conversation.framing == framing


def test_auto_waits_for_a_whole_length_prefix() -> None:
    conversation = Conversation("auto", 64)
    assert conversation.feed("up", b"\x00\x00") == []
    assert conversation.framing == "auto"
    assert [s.preview for s in conversation.feed("up", b"\x00\x01a")] == [b"a"]


def test_a_postgresql_startup_message_is_shown_at_once_not_held_for_the_next_one() -> None:
    """psql's first bytes: a length that counts its own 4 bytes, then the whole message.
    Taken for a udskit length frame, it was held back until 4 bytes of the query came,
    after the server's answer, and then shown cut in the wrong places."""
    params = b"user\x00root\x00database\x00root\x00application_name\x00psql\x00\x00"
    startup = (8 + len(params)).to_bytes(4, "big") + b"\x00\x03\x00\x00" + params
    query = b"Q\x00\x00\x00\x0dselect 1\x00"
    conversation = Conversation("auto", 1024)
    shown = conversation.feed("up", startup)
    assert [(s.framing, s.preview) for s in shown] == [("raw", startup)]
    assert [s.preview for s in conversation.feed("down", b"R\x00\x00\x00\x08\x00\x00\x00\x00")]
    assert [s.preview for s in conversation.feed("up", query)] == [query]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="framing must be one of auto, length, lines"):
        Conversation("xml", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes must be 0 or more"):
        tap.Printer(lambda b: None, start=0.0, max_bytes=-1)
    with pytest.raises(ValueError, match=r"pcap port must be 1\.\.65535"):
        tap.PcapWriter(io.BytesIO(), port=70000)


def test_packets_are_whole_messages() -> None:
    assert show_packet(b"\x00\x00\x00\x02hi", "length", 10).preview == b"hi"
    odd = show_packet(b"\x00\x00\x00\x09hi", "length", 10)
    assert odd.note == "length prefix says 9 B, the message holds 2"
    assert show_packet(b"\x01\x02", "auto", 10).framing == "message"
    assert preview_text(b"\x01\x02", 2) == "01 02"


_CLIENT = PeerCred(4242, 1000, 1000)
_SCRIPT: list[tap.Event] = [
    tap.Opened(1, 10.5, _CLIENT),
    tap.Data(1, 10.75, "up", b"ping\n", (tap.PassedFd(7, "memfd", "memfd:frame", 12288),)),
    tap.Data(1, 11.0, "down", b"pong\n"),
    tap.Closed(1, 11.25, "up", "end of stream"),
    tap.Refused(2, 11.5, PeerCred(4343, 0, 0), "not the tap's user"),
    tap.Closed(1, 12.0, None),
]


def _render(**options: object) -> list[str]:
    out: list[bytes] = []
    printer = tap.Printer(out.append, start=10.0, **options)  # type: ignore[arg-type]
    for event in _SCRIPT:
        printer(event)
    return b"".join(out).decode().splitlines()


def test_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PeerCred, "process_name", property(lambda self: "client"))
    assert _render() == [
        "0.500000 #1 open client[4242] uid 1000",
        '0.750000 #1 > client[4242] uid 1000  5 B  line "ping\\n" [fd 7: memfd:frame (12 KiB)]',
        '1.000000 #1 < client[4242] uid 1000  5 B  line "pong\\n"',
        "1.250000 #1 > end of stream",
        "1.500000 #2 refused client[4343] uid 0: not the tap's user",
        "2.000000 #1 closed",
    ]


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PeerCred, "process_name", property(lambda self: "client"))
    records = [json.loads(line) for line in _render(as_json=True)]
    assert records[1] == {
        "time": 10.75,
        "t": 0.75,
        "conn": 1,
        "event": "message",
        "direction": "up",
        "pid": 4242,
        "uid": 1000,
        "gid": 1000,
        "command": "client",
        "size": 5,
        "framing": "line",
        "text": "ping\n",
        "truncated": False,
        "fds": [{"fd": 7, "kind": "memfd", "name": "memfd:frame", "size": 12288}],
    }
    assert [r["event"] for r in records] == [
        "open",
        "message",
        "message",
        "end",
        "refused",
        "closed",
    ]


def test_the_capture_holds_a_tcp_conversation_with_true_sequence_numbers() -> None:
    file = io.BytesIO()
    writer = tap.PcapWriter(file, port=5432)
    for event in _SCRIPT:
        writer(event)
    writer(tap.Closed(1, 12.0, "down", "end of stream"))
    file.seek(0)
    segments = []
    for _, frame in dpkt.pcap.Reader(file):
        tcp = dpkt.ethernet.Ethernet(frame).data.data
        segments.append((tcp.sport, tcp.dport, tcp.flags, tcp.seq, bytes(tcp.data)))
    syn, fin, ack, psh = dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH
    assert segments == [
        (32768, 5432, syn, 999, b""),
        (5432, 32768, syn | ack, 4999, b""),
        (32768, 5432, ack, 1000, b""),
        (32768, 5432, psh | ack, 1000, b"ping\n"),
        (5432, 32768, psh | ack, 5000, b"pong\n"),
        (32768, 5432, fin | ack, 1005, b""),
    ]


def test_without_h11_http_is_shown_raw_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h11", None)  # import h11 now raises ImportError
    conversation = Conversation("auto", 64)
    (shown,) = conversation.feed("up", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert shown.framing == "raw"
    assert shown.note == "HTTP shown raw: h11 is not installed (pip install 'udskit[tap]')"
    assert conversation.feed("up", b"more")[0].note == ""


def test_passed_descriptors_read_as_a_line() -> None:
    assert str(tap.PassedFd(7, "memfd", "memfd:frame", 12 * 1024)) == "fd 7: memfd:frame (12 KiB)"
    assert str(tap.PassedFd(8, "file", "/var/log/app.log", 100)) == "fd 8: /var/log/app.log (100 B)"
    assert str(tap.PassedFd(9, "file", "/big", 3 << 30)) == "fd 9: /big (3 GiB)"
    assert str(tap.PassedFd(10, "pipe", "pipe", None)) == "fd 10: pipe"
