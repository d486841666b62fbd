"""The sans-IO framing core (``udskit.proto``): bytes in, messages out, bytes back.

Properties come from Hypothesis: however a valid stream is cut into reads, the same messages
come out; whatever bytes arrive, the decoder returns messages or raises ProtocolError.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udskit import ConnectionClosed, FrameTooLarge, ProtocolError
from udskit.proto import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_LINE,
    HEADER,
    NEED_DATA,
    Framing,
    LengthPrefixed,
    Lines,
    Raw,
    make_framing,
)


# -- helpers ---------------------------------------------------------------------------------
def encoded(framing: Framing, messages: Sequence[bytes]) -> bytes:
    return b"".join(bytes(part) for message in messages for part in framing.encode(message))


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    """``data`` split at ``points`` (positions, any order, duplicates allowed)."""
    edges = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def drain(framing: Framing) -> list[bytes]:
    """Every complete message buffered now (bounded: each one consumes at least a byte)."""
    out: list[bytes] = []
    for _ in range(framing.buffered + 2):
        message = framing.next_message()
        if message is NEED_DATA or message is CLOSED:
            return out
        assert isinstance(message, bytes)
        out.append(message)
    pytest.fail("next_message() kept returning messages without consuming input")


def decode(framing: Framing, chunks: Sequence[bytes]) -> list[bytes]:
    """Feed ``chunks`` then EOF; return all messages, asserting a clean end."""
    out: list[bytes] = []
    for chunk in chunks:
        framing.receive_data(chunk)
        out.extend(drain(framing))
    framing.receive_eof()
    out.extend(drain(framing))
    assert framing.next_message() is CLOSED
    assert framing.next_message() is CLOSED  # and it stays closed
    return out


FRAMINGS: dict[str, Callable[[int], Framing]] = {
    "length": LengthPrefixed,
    "lines": Lines,
    "raw": lambda _limit: Raw(),
}

splits = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


# -- any split of a valid stream gives the same messages ---------------------------------------
@given(st.lists(st.binary(max_size=300), max_size=12), splits)
def test_length_prefixed_any_split(messages: list[bytes], points: list[int]) -> None:
    stream = encoded(LengthPrefixed(), messages)
    assert decode(LengthPrefixed(), cut(stream, points)) == messages


@given(
    st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    splits,
)
def test_lines_any_split(messages: list[bytes], points: list[int]) -> None:
    stream = encoded(Lines(), messages)
    assert decode(Lines(), cut(stream, points)) == messages


@given(st.lists(st.binary(max_size=300), max_size=12), splits)
def test_raw_any_split_keeps_the_bytes(messages: list[bytes], points: list[int]) -> None:
    stream = encoded(Raw(), messages)
    received = decode(Raw(), cut(stream, points))
    assert b"".join(received) == stream
    assert all(received)  # raw never yields an empty message: b"" would mean end of stream


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=8), splits)
def test_messages_are_returned_as_soon_as_complete(
    messages: list[bytes], points: list[int]
) -> None:
    # No message waits for the next read or for EOF once its last byte has arrived.
    framing = LengthPrefixed()
    ends = [len(encoded(framing, messages[: n + 1])) for n in range(len(messages))]
    got: list[bytes] = []
    fed = 0
    for chunk in cut(encoded(framing, messages), points):
        framing.receive_data(chunk)
        fed += len(chunk)
        got.extend(drain(framing))
        assert got == messages[: sum(end <= fed for end in ends)]


# -- any bytes: messages or ProtocolError, nothing else -----------------------------------------
@given(
    st.sampled_from(sorted(FRAMINGS)),
    st.integers(min_value=1, max_value=64),
    st.binary(max_size=400),
    splits,
)
def test_random_bytes_give_messages_or_protocol_error(
    name: str, limit: int, data: bytes, points: list[int]
) -> None:
    framing = FRAMINGS[name](limit)
    failure: Exception | None = None
    try:
        for chunk in cut(data, points):
            framing.receive_data(chunk)
            for message in drain(framing):
                assert name == "raw" or len(message) <= limit
                assert name != "lines" or b"\n" not in message
        framing.receive_eof()
        drain(framing)
        assert framing.next_message() is CLOSED
        assert framing.buffered == 0
    except (ProtocolError, ConnectionClosed) as exc:
        failure = exc
    if isinstance(failure, ConnectionClosed):  # only at EOF, and only with a cut message
        assert failure.mid_message
        assert framing.at_eof
        assert framing.buffered > 0
    if failure is not None:
        assert "\n" not in str(failure)


# -- length prefix ----------------------------------------------------------------------------
def test_length_wire_format() -> None:
    assert encoded(LengthPrefixed(), [b"hi", b""]) == b"\0\0\0\x02hi\0\0\0\0"


def test_max_frame_is_checked_from_the_header_alone() -> None:
    framing = LengthPrefixed()
    framing.receive_data(HEADER.pack(0xFFFFFFFF))  # announces 4 GiB; no payload follows
    with pytest.raises(FrameTooLarge, match=rf"{0xFFFFFFFF} bytes, over max_frame") as info:
        framing.next_message()
    assert isinstance(info.value, ProtocolError)
    assert framing.buffered == HEADER.size  # nothing was read past the header


def test_max_frame_boundary() -> None:
    framing = LengthPrefixed(max_frame=10)
    framing.receive_data(HEADER.pack(10) + b"x" * 10)
    assert framing.next_message() == b"x" * 10
    framing.receive_data(HEADER.pack(11))
    with pytest.raises(FrameTooLarge, match=r"11 bytes, over max_frame \(10 bytes\)"):
        framing.next_message()


def test_default_limits() -> None:
    assert LengthPrefixed().max_frame == DEFAULT_MAX_FRAME == 16 * 1024 * 1024
    assert Lines().max_line == DEFAULT_MAX_LINE == 64 * 1024
    assert make_framing("length").max_frame == DEFAULT_MAX_FRAME  # type: ignore[union-attr]
    assert make_framing("lines", max_frame=5).max_line == 5  # type: ignore[union-attr]
    assert make_framing("raw").name == "raw"


def test_encode_refuses_a_payload_over_max_frame() -> None:
    framing = LengthPrefixed(max_frame=4)
    assert encoded(framing, [b"1234"]) == HEADER.pack(4) + b"1234"
    with pytest.raises(FrameTooLarge, match=r"message of 5 bytes is over max_frame \(4 bytes\)"):
        framing.encode(b"12345")


def test_wanted_counts_the_missing_bytes() -> None:
    framing = LengthPrefixed()
    assert framing.wanted() == 0
    framing.receive_data(HEADER.pack(10) + b"abc")
    assert framing.wanted() == 7
    framing.receive_data(b"defghij")
    assert framing.wanted() == 0


@pytest.mark.parametrize("bad", [0, -1, 0x1_0000_0000])
def test_length_prefixed_refuses_a_bad_limit(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame must be between 1 and"):
        LengthPrefixed(bad)


def test_eof_inside_the_header() -> None:
    framing = LengthPrefixed()
    framing.receive_data(b"\0\0")
    assert framing.next_message() is NEED_DATA
    framing.receive_eof()
    with pytest.raises(ConnectionClosed, match="mid-message: 2 bytes received") as info:
        framing.next_message()
    assert info.value.mid_message


def test_eof_inside_the_payload_says_how_much_arrived() -> None:
    framing = LengthPrefixed()
    framing.receive_data(HEADER.pack(100) + b"x" * 30)
    framing.receive_eof()
    with pytest.raises(ConnectionClosed, match=r"34 of 104 bytes received") as info:
        framing.next_message()
    assert info.value.mid_message


def test_data_after_eof_is_a_protocol_error() -> None:
    framing = LengthPrefixed()
    framing.receive_eof()
    assert framing.at_eof
    with pytest.raises(ProtocolError, match="data received after end of stream"):
        framing.receive_data(b"x")


def test_large_stream_is_compacted_and_still_exact() -> None:
    # Enough consumed bytes to trigger buffer compaction, with messages straddling reads.
    messages = [bytes([i % 256]) * (1000 + i) for i in range(300)]
    stream = encoded(LengthPrefixed(), messages)
    chunks = [stream[i : i + 4093] for i in range(0, len(stream), 4093)]
    assert decode(LengthPrefixed(), chunks) == messages


# -- lines ------------------------------------------------------------------------------------
def test_lines_wire_format_and_last_line_without_newline() -> None:
    framing = Lines()
    assert encoded(framing, [b"a", b""]) == b"a\n\n"
    assert decode(Lines(), [b"a\n\nlast"]) == [b"a", b"", b"last"]  # printf 'a\n\nlast' | nc


def test_line_over_max_line_with_its_newline() -> None:
    framing = Lines(max_line=4)
    framing.receive_data(b"1234\n12345\n")
    assert framing.next_message() == b"1234"
    with pytest.raises(FrameTooLarge, match=r"line of 5 bytes, over max_line \(4 bytes\)"):
        framing.next_message()


def test_line_over_max_line_is_refused_before_its_newline() -> None:
    framing = Lines(max_line=4)
    framing.receive_data(b"1234")
    assert framing.next_message() is NEED_DATA  # exactly max_line may still end here
    framing.receive_data(b"5")
    with pytest.raises(FrameTooLarge, match="over 4 bytes without a newline"):
        framing.next_message()


def test_line_scan_resumes_where_it_stopped() -> None:
    framing = Lines(max_line=100)
    for piece in (b"ab", b"cd", b"ef\ngh"):
        framing.receive_data(piece)
    assert framing.next_message() == b"abcdef"
    assert framing.next_message() is NEED_DATA
    framing.receive_data(b"\n")
    assert framing.next_message() == b"gh"


def test_lines_encode_refusals() -> None:
    with pytest.raises(ProtocolError, match=r"contains a newline.*framing='length'"):
        Lines().encode(b"two\nlines")
    with pytest.raises(FrameTooLarge, match=r"line of 5 bytes is over max_line \(4 bytes\)"):
        Lines(max_line=4).encode(b"12345")
    with pytest.raises(ValueError, match="max_line must be positive"):
        Lines(0)


def _line_limit_errors(framing: Lines) -> list[str]:
    """The three errors of a line over the limit (4 bytes): sent, received whole, and
    received without its newline."""
    errors = []
    with pytest.raises(FrameTooLarge) as sent:
        framing.encode(b"12345")
    errors.append(str(sent.value))
    for data in (b"12345\n", b"12345"):
        receiver = (
            make_framing("lines", max_frame=4) if framing.limit_name == "max_frame" else Lines(4)
        )
        receiver.receive_data(data)
        with pytest.raises(FrameTooLarge) as received:
            receiver.next_message()
        errors.append(str(received.value))
    return errors


def test_a_line_limit_is_named_as_its_caller_set_it() -> None:
    # A channel's 'lines' framing said "max_line must be raised": connect(), pair() and
    # listen() have no max_line, their limit is max_frame (which the CLI shows as
    # --max-frame); sans-IO users of Lines(max_line=...) still read max_line.
    for framing, name in (
        (Lines(4), "max_line"),
        (make_framing("lines", max_frame=4), "max_frame"),
    ):
        assert isinstance(framing, Lines)
        sent, whole, endless = _line_limit_errors(framing)
        assert sent == (
            f"line of 5 bytes is over {name} (4 bytes): send it in parts, or raise {name} on "
            "both ends"
        )
        assert whole == (
            f"peer sent a line of 5 bytes, over {name} (4 bytes): it must send shorter lines, "
            f"or {name} must be raised"
        )
        assert endless == (
            f"peer sent over 4 bytes without a newline ({name}): it does not speak 'lines' "
            f"framing, or {name} must be raised"
        )
        (other,) = {"max_line", "max_frame"} - {name}
        assert not any(other in error for error in (sent, whole, endless))


# -- raw --------------------------------------------------------------------------------------
def test_raw_returns_what_arrived() -> None:
    framing = Raw()
    assert framing.encode(b"abc") == [b"abc"]
    framing.receive_data(b"ab")
    framing.receive_data(b"c")
    assert framing.next_message() == b"abc"
    assert framing.next_message() is NEED_DATA
    framing.receive_eof()
    assert framing.next_message() is CLOSED


def test_make_framing_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown framing 'json': choose 'length', 'lines'"):
        make_framing("json")


# -- descriptors travel with the message whose first byte they came with ----------------------
def test_fds_are_handed_out_with_their_message() -> None:
    framing = LengthPrefixed()
    first, second, third = (encoded(framing, [m]) for m in (b"one", b"two", b"three"))
    framing.receive_data(first, fds=[10])
    framing.receive_data(second[:3])  # a read can stop mid-message
    framing.receive_data(second[3:] + third[:2])
    framing.receive_data(third[2:])
    assert framing.next_message() == b"one"
    assert framing.take_fds() == [10]
    assert framing.take_fds() == []  # ownership passed once
    assert framing.next_message() == b"two"
    assert framing.take_fds() == []


def test_fds_with_a_later_message_wait_for_it() -> None:
    framing = Lines()
    framing.receive_data(b"plain\n")
    framing.receive_data(b"with fds\n", fds=[7, 8])
    framing.receive_data(b"also\n", fds=[9])
    assert framing.next_message() == b"plain"
    assert framing.take_fds() == []
    assert framing.next_message() == b"with fds"
    assert framing.take_fds() == [7, 8]
    assert framing.next_message() == b"also"
    assert framing.take_fds() == [9]


def test_fds_with_an_empty_message() -> None:
    framing = LengthPrefixed()
    framing.receive_data(HEADER.pack(0), fds=[5])
    assert framing.next_message() == b""
    assert framing.take_fds() == [5]


def test_held_fds_returns_every_descriptor_not_taken() -> None:
    framing = LengthPrefixed()
    framing.receive_data(encoded(framing, [b"a"]), fds=[3])
    framing.receive_data(encoded(framing, [b"b"]), fds=[4, 5])
    framing.receive_data(HEADER.pack(9) + b"part", fds=[6])  # an unfinished message
    assert framing.next_message() == b"a"  # fd 3 is returned but not yet taken
    assert sorted(framing.held_fds()) == [3, 4, 5, 6]
    assert framing.held_fds() == []  # ownership passed: nothing is handed out twice
    assert framing.take_fds() == []


# -- the I/O layers' entry points: feed() and receive_payload() -----------------------------
def read_with(
    framing: Framing, data: st.DataObject, reads: Sequence[tuple[bytes, list[int]]]
) -> list[tuple[bytes, list[int]]]:
    """Feed ``reads`` as an I/O layer would, picking an entry point for each read at random:
    ``receive_data``, ``feed`` (with its one-frame shortcut), when exactly one header is
    buffered, ``receive_payload`` (the zero-copy path), or when a header and part of its
    payload are, and the read holds the rest, ``receive_rest`` (the payload completed in
    its own object, the read's bytes after it fed as usual). Every message is returned with
    the descriptors ``take_fds`` gives right after it."""
    got: list[tuple[bytes, list[int]]] = []

    def collect(first: object) -> None:
        message = first
        while isinstance(message, bytes):
            got.append((message, framing.take_fds()))
            message = framing.next_message()

    for chunk, fds in reads:
        ways = ["receive_data", "feed"]
        if isinstance(framing, LengthPrefixed) and not fds and framing.header_only():
            ways.append("receive_payload")
        if isinstance(framing, LengthPrefixed) and not fds:
            size, have = framing.partial()
            if size and len(chunk) >= size - have:
                ways.append("receive_rest")
        way = data.draw(st.sampled_from(ways))
        if way == "receive_data":
            framing.receive_data(chunk, fds)
            collect(framing.next_message())
        elif way == "feed":
            collect(framing.feed(chunk, fds))
        elif way == "receive_rest":
            assert isinstance(framing, LengthPrefixed)
            size, have = framing.partial()
            message = bytearray(size)
            framing.copy_partial(memoryview(message))
            message[have:] = chunk[: size - have]
            collect(framing.receive_rest(bytes(message)))
            if len(chunk) > size - have:
                collect(framing.feed(chunk[size - have :]))
        else:
            assert isinstance(framing, LengthPrefixed)
            collect(framing.receive_payload(chunk))
    return got


@given(st.sampled_from(["length", "lines", "raw"]), st.data())
def test_every_entry_point_gives_the_same_messages(name: str, data: st.DataObject) -> None:
    payloads = data.draw(st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"."))))
    framing = make_framing(name)
    stream = encoded(framing, payloads)
    chunks = cut(stream, data.draw(splits))
    got = read_with(framing, data, [(chunk, []) for chunk in chunks])
    assert framing.feed(b"") is CLOSED  # an empty read is the end of the stream
    messages = [message for message, _ in got]
    if name == "raw":
        assert b"".join(messages) == stream
    else:
        assert messages == payloads


@st.composite
def kernel_reads(
    draw: st.DrawFn, name: str
) -> tuple[list[bytes], list[list[int]], list[tuple[bytes, list[int]]]]:
    """Messages, the descriptors each was sent with, and the reads Linux could deliver.

    unix_stream_read_generic() joins skbs into one read, detaches the descriptors of the
    first skb that carries some, and ends the read there (or earlier, when the caller's
    buffer is full). The sender passes descriptors with the first skb of one message. So a
    read that brings descriptors may start anywhere before that message, holds its first
    byte, and ends at any byte of it; every other read boundary is arbitrary.
    """
    payloads = draw(
        st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b".")), max_size=8)
    )
    framing = make_framing(name)
    frames = [encoded(framing, [p]) for p in payloads]
    stream = b"".join(frames)
    cuts = set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    sent: list[list[int]] = []
    carried: dict[int, list[int]] = {}  # end of a read -> the descriptors it brings
    start = 0
    for index, frame in enumerate(frames):
        end = start + len(frame)
        fds = [100 + index] if draw(st.booleans()) else []
        sent.append(fds)
        if fds:
            stop = draw(st.integers(start + 1, end))
            cuts -= set(range(start + 1, stop))  # one read holds the first byte up to stop
            cuts.add(stop)
            carried[stop] = fds
        start = end
    edges = sorted({0, len(stream), *(c for c in cuts if 0 < c < len(stream))})
    reads = [(stream[a:b], carried.get(b, [])) for a, b in itertools.pairwise(edges)]
    return payloads, sent, reads


@given(st.sampled_from(["length", "lines"]), st.data())
def test_fds_go_with_the_message_they_were_sent_with(name: str, data: st.DataObject) -> None:
    payloads, sent, reads = data.draw(kernel_reads(name))
    framing = make_framing(name)
    got = read_with(framing, data, reads)
    assert got == list(zip(payloads, sent, strict=True))
    framing.receive_eof()
    assert framing.next_message() is CLOSED
    assert framing.held_fds() == []  # nothing left behind, nothing handed out twice


# -- sentinels --------------------------------------------------------------------------------
def test_sentinels_have_readable_reprs() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(CLOSED) == "CLOSED"
    assert NEED_DATA is not CLOSED
