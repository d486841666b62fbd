"""Fuzzing every parser of bytes (or text) that comes from a peer, a file or the environment.

Properties, for any input: only the documented errors, each one line; nothing unbounded;
and for the stream framings, the same messages (and the same verdict) however the bytes are
split into reads: every split point for small inputs, sampled splits for larger ones.
Hypothesis runs derandomized with bounded examples, so a run is the same every time.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udskit.address import Address
from udskit.errors import AddressError, ProtocolError, UdsError
from udskit.proto import handover
from udskit.proto.framing import CLOSED, NEED_DATA, Control, LengthPrefixed, Lines
from udskit.proto.shm import (
    CONTROL_BIT,
    RECORD_SIZE,
    Ledger,
    PacketWire,
    check_record,
    decode_record,
    encode_record,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text, f"{type(exc).__name__} without a message"
    assert "\n" not in text, f"multi-line error: {text!r}"


# -- stream framings ---------------------------------------------------------------------------
def _outcome(decoder: LengthPrefixed | Lines, chunks: list[bytes]) -> tuple[object, ...]:
    """What a decoder makes of ``chunks`` (one read each) then the end of the stream:
    the messages and records it returned, then how it ended (CLOSED, or the error type)."""
    got: list[object] = []
    try:
        for chunk in [*chunks, b""]:
            message = decoder.feed(chunk)
            while message is not NEED_DATA:
                if message is CLOSED:
                    return (*got, "CLOSED")
                got.append(("record", message.body) if isinstance(message, Control) else message)
                message = decoder.next_message()
    except UdsError as exc:
        _one_line(exc)
        return (*got, type(exc).__name__)
    raise AssertionError("the end of the stream was neither a clean end nor an error")


def _splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way of cutting ``data`` into reads (all 2**(n-1) for small inputs)."""
    n = len(data)
    for cuts in itertools.product((False, True), repeat=max(0, n - 1)):
        chunks, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                chunks.append(data[start:i])
                start = i
        chunks.append(data[start:])
        yield chunks


def _frames() -> st.SearchStrategy[bytes]:
    """Streams of well-formed frames, records, and arbitrary bytes mixed in."""
    frame = st.binary(max_size=6).map(lambda p: struct.pack(">I", len(p)) + p)
    record = st.tuples(st.integers(1, 4), st.integers(0, 2**64 - 1)).map(
        lambda r: encode_record(r[0], r[1])
    )
    junk = st.binary(min_size=1, max_size=5)
    return st.lists(st.one_of(frame, record, junk), max_size=4).map(b"".join)


def _length(max_frame: int, records: bool) -> LengthPrefixed:
    return LengthPrefixed(max_frame, records=records)


@FUZZ
@given(data=st.binary(max_size=11), max_frame=st.sampled_from([1, 3, 8, 64]))
def test_length_prefixed_every_split_of_small_input_agrees(data: bytes, max_frame: int) -> None:
    whole = _outcome(_length(max_frame, False), [data])
    for chunks in _splits(data):
        assert _outcome(_length(max_frame, False), chunks) == whole, chunks


@FUZZ
@given(data=_frames(), seed=st.randoms(use_true_random=False), records=st.booleans())
def test_length_prefixed_sampled_splits_agree(data: bytes, seed, records: bool) -> None:  # type: ignore[no-untyped-def]
    whole = _outcome(_length(64, records), [data])
    for _ in range(8):
        cuts = sorted(seed.sample(range(1, max(2, len(data))), min(len(data) // 3, 6)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert _outcome(_length(64, records), [c for c in chunks if c]) == whole, chunks
    # one byte per read: the longest path through every state
    assert _outcome(_length(64, records), [bytes([b]) for b in data]) == whole


@FUZZ
@given(data=st.binary(max_size=10), max_line=st.sampled_from([1, 2, 4, 64]))
def test_lines_every_split_of_small_input_agrees(data: bytes, max_line: int) -> None:
    data = data.replace(b"\x00", b"\n")  # plenty of delimiters
    whole = _outcome(Lines(max_line), [data])
    for chunks in _splits(data):
        assert _outcome(Lines(max_line), chunks) == whole, chunks


@FUZZ
@given(data=_frames())
def test_records_are_decoded_whole_or_refused(data: bytes) -> None:
    for item in _outcome(_length(64, True), [data]):
        if isinstance(item, tuple):
            try:
                record = decode_record(item[1])
            except ProtocolError as exc:
                _one_line(exc)
            else:
                assert len(item[1]) == RECORD_SIZE
                assert 1 <= record.kind <= 4


def test_a_huge_announced_record_is_refused_before_buffering() -> None:
    # Handed on at once with an empty body, which decode_record refuses (the channel then
    # closes, as for any bad record); nothing after it is decoded.
    decoder = LengthPrefixed(1024, records=True)
    decoder.receive_data(struct.pack(">I", CONTROL_BIT | 0x7FFF_FFFF))
    record = decoder.next_message()
    assert isinstance(record, Control)
    with pytest.raises(ProtocolError):
        decode_record(record.body)
    with pytest.raises(ProtocolError, match="record of 2147483647 bytes"):
        decoder.next_message()


# -- shared-memory records and packets --------------------------------------------------------
@FUZZ
@given(body=st.binary(max_size=40), fds=st.integers(0, 3), opted=st.booleans())
def test_record_bodies_decode_or_are_refused(body: bytes, fds: int, opted: bool) -> None:
    try:
        record = decode_record(body)
        check_record(record, fds, peer_opted=opted)
    except ProtocolError as exc:
        _one_line(exc)


@FUZZ
@given(
    tag=st.one_of(st.none(), st.integers(0, 255)),
    body=st.one_of(st.binary(max_size=80), st.just(b"\xffudskit-shm-hello/abcdefgh\x01")),
    role=st.sampled_from(["pair", "listener", "client"]),
)
def test_packets_are_a_message_records_a_switch_or_refused(
    tag: int | None, body: bytes, role: str
) -> None:
    wire = PacketWire(role, b"\0udskit-shm/abcdefgh")
    try:
        wire.incoming(tag, memoryview(body))
    except ProtocolError as exc:
        _one_line(exc)


@FUZZ
@given(slots=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**20)), max_size=8))
def test_ledger_holds_only_disjoint_slots_inside_the_pool(slots: list[tuple[int, int]]) -> None:
    # offsets and lengths as decode_record gives them: unsigned 64-bit
    ledger = Ledger(1 << 20, 1 << 16)
    for offset, length in slots:
        try:
            ledger.accept(offset, length)
        except ProtocolError as exc:
            _one_line(exc)
    spans = sorted((o, o + -(-n // 4096) * 4096) for o, n in ledger.held.items())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert all(o >= 0 and o + n <= 1 << 20 for o, n in ledger.held.items())


@FUZZ
@given(
    packet=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3),
                st.dictionaries(st.sampled_from(["op", "pid", "type", "reason"]), inner),
            ),
            max_leaves=6,
        ).map(lambda v: __import__("json").dumps(v).encode()),
    ),
    descriptors=st.integers(0, 2),
)
def test_handover_messages_decode_or_are_refused(packet: bytes, descriptors: int) -> None:
    try:
        handover.decode(packet, descriptors, ("take", "listener", "ready", "stopped"))
    except ProtocolError as exc:
        _one_line(exc)


# -- addresses ----------------------------------------------------------------------------------
_ADDRESSY = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(
        "".join,
        st.lists(
            st.sampled_from(
                [
                    "fd:",
                    "tcp:",
                    "unix:",
                    "abstract:",
                    "@",
                    "/",
                    ":",
                    "[",
                    "]",
                    "::1",
                    "9" * 30,
                    "\0",
                    "\n",
                    "listen",
                    "x",
                    "\udcff",
                    "é",
                    "9" * 5000,
                ]
            ),
            max_size=5,
        ),
    ),
)


@FUZZ
@given(value=_ADDRESSY)
def test_address_parse_gives_an_address_or_one_address_error(value: str | bytes) -> None:
    try:
        address = Address.parse(value)
    except AddressError as exc:
        _one_line(exc)
        return
    if address.kind == "fd":
        assert 0 <= address.fd <= 2**31 - 1  # a C int, as every descriptor call takes
    if address.kind == "tcp":
        assert 0 <= address.port <= 65535
    if address.kind in ("path", "abstract", "fd") or address.host == address.host.strip("[]"):
        assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    "text",
    ["fd:" + "9" * 5000, "tcp:localhost:" + "9" * 5000, "fd:2147483648", "fd:" + "9" * 30],
)
def test_out_of_range_numbers_in_addresses_are_address_errors(text: str) -> None:
    with pytest.raises(AddressError) as caught:
        Address.parse(text)
    _one_line(caught.value)


@pytest.mark.parametrize("host", ["..", ".a", "a..b", "a" * 64 + ".example", "a\0b"])
def test_a_tcp_host_that_cannot_be_looked_up_is_an_address_error(host: str) -> None:
    """Found when parsing: at connect() an empty or over-long label raised IDNA's
    UnicodeError, which named neither the address nor the rule."""
    with pytest.raises(AddressError) as caught:
        Address.parse(f"tcp:{host}:80")
    _one_line(caught.value)


# -- socket activation's environment ------------------------------------------------------------
_ENV_VALUE = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.sampled_from(
        ["1", "0", "3", str(os.getpid()), "9" * 5000, "9" * 25, "-1", "+3", " 3", "3\n4", "a:b\nc"]
    ),
)


@FUZZ
@given(pid=_ENV_VALUE, fds=_ENV_VALUE, names=_ENV_VALUE)
def test_listen_variables_parse_or_are_refused(
    pid: str | None, fds: str | None, names: str | None
) -> None:
    from udskit import activation

    env = {
        key: value
        for key, value in (("LISTEN_PID", pid), ("LISTEN_FDS", fds), ("LISTEN_FDNAMES", names))
        if value is not None
    }
    try:
        passed = activation.listen_fds(env, pid=os.getpid())
    except AddressError as exc:
        _one_line(exc)
        assert activation.inherited(env) == () or pid != str(os.getpid())
        return
    assert all(entry.fd >= 3 for entry in passed)
    assert activation.inherited(env) == passed or pid != str(os.getpid())


# -- control data --------------------------------------------------------------------------------
@FUZZ
@given(
    items=st.lists(
        st.one_of(
            st.tuples(st.just("rights"), st.integers(0, 3), st.integers(0, 3)),
            st.tuples(st.just("creds"), st.binary(max_size=16)),
            st.tuples(
                st.just("other"), st.integers(0, 300), st.integers(0, 5), st.binary(max_size=8)
            ),
        ),
        max_size=4,
    ),
    ctrunc=st.booleans(),
    max_fds=st.one_of(st.none(), st.integers(0, 4)),
)
def test_control_data_is_taken_whole_or_refused_with_every_fd_closed(  # type: ignore[no-untyped-def]
    items, ctrunc, max_fds
) -> None:
    from udskit.ancillary import unpack

    opened: list[int] = []
    ancdata = []
    for item in items:
        if item[0] == "rights":
            fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(item[1])]
            opened.extend(fds)
            # a cut (MSG_CTRUNC) may leave part of the last int
            data = struct.pack(f"{len(fds)}i", *fds) + b"\x00" * (item[2] % 4 if ctrunc else 0)
            ancdata.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, data))
        elif item[0] == "creds":
            ancdata.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, item[1]))
        else:
            ancdata.append((item[1], item[2], item[3]))
    flags = int(socket.MSG_CTRUNC) if ctrunc else 0
    try:
        received = unpack(ancdata, flags, "fuzz", max_fds)
    except ProtocolError as exc:
        _one_line(exc)
        kept: list[int] = []
    else:
        kept = received.fds
        assert sorted(kept) == sorted(opened)
    still_open = [fd for fd in opened if _is_open(fd)]
    try:
        assert sorted(still_open) == sorted(kept), "a descriptor was leaked or lost"
    finally:
        for fd in still_open:
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@FUZZ
@given(usec=_ENV_VALUE, owner=st.sampled_from([None, str(os.getpid()), "1"]))
def test_watchdog_variables_give_an_interval_or_none(usec: str | None, owner: str | None) -> None:
    from udskit.systemd import watchdog_interval

    env = {"WATCHDOG_USEC": usec, "WATCHDOG_PID": owner}
    interval = watchdog_interval({k: v for k, v in env.items() if v is not None})
    assert interval is None or 0 < interval < float("inf")


# -- descriptors across reads ------------------------------------------------------------------
@FUZZ
@given(
    payloads=st.lists(st.binary(max_size=6), min_size=1, max_size=5),
    carrying=st.sets(st.integers(0, 4)),
    cuts=st.sets(st.integers(1, 60)),
    lines=st.booleans(),
)
def test_descriptors_go_with_the_message_they_were_sent_with(
    payloads: list[bytes], carrying: set[int], cuts: set[int], lines: bool
) -> None:
    """As the kernel delivers them: each message is one sendmsg(); a read that first touches
    a message carrying descriptors gets them and ends at that message's end."""
    if lines:
        payloads = [p.replace(b"\n", b".") for p in payloads]
        frames = [p + b"\n" for p in payloads]
    else:
        frames = [struct.pack(">I", len(p)) + p for p in payloads]
    starts = list(itertools.accumulate([0] + [len(f) for f in frames]))
    stream = b"".join(frames)
    carrying = {i for i in carrying if i < len(frames)}
    points = {c for c in cuts if c < len(stream)}
    points |= {starts[i + 1] for i in carrying}  # the read ends where that message does
    bounds = [0, *sorted(points - {len(stream)}), len(stream)]
    decoder: LengthPrefixed | Lines = Lines(64) if lines else LengthPrefixed(64)
    got: list[tuple[bytes, list[int]]] = []
    for a, b in itertools.pairwise(bounds):
        fds = [i for i in carrying if a <= starts[i] < b]  # descriptor "number" = index
        decoder.receive_data(stream[a:b], fds)
        while isinstance(message := decoder.next_message(), bytes):
            got.append((message, decoder.take_fds()))
    assert got == [(p, [i] if i in carrying else []) for i, p in enumerate(payloads)]


@FUZZ
@given(
    size=st.integers(3, 40),
    at=st.integers(1, 39),
    started=st.booleans(),
    lines=st.booleans(),
)
def test_one_message_takes_the_descriptors_of_one_read_at_most(
    size: int, at: int, started: bool, lines: bool
) -> None:
    """Descriptors with the middle of a message (a relay passes them on with the end of
    what it read) go with that message, unless another read already gave it some."""
    at = min(at, size - 2)
    frame = b"x" * size + b"\n" if lines else struct.pack(">I", size) + b"x" * size
    cut = at + (0 if lines else 4)  # the second read starts inside the message
    decoder: LengthPrefixed | Lines = Lines(64) if lines else LengthPrefixed(64)
    decoder.receive_data(frame[:cut], [6] if started else [])
    if not started:
        decoder.receive_data(frame[cut : cut + 1], [7])
        decoder.receive_data(frame[cut + 1 :])
        assert decoder.next_message() == b"x" * size
        assert decoder.take_fds() == [7]
        return
    with pytest.raises(ProtocolError) as refused:
        decoder.receive_data(frame[cut : cut + 1], [7])
    _one_line(refused.value)
    with pytest.raises(ProtocolError):  # and the stream stays refused
        decoder.next_message()
    assert decoder.held_fds() == [6, 7]


# -- the outbox ----------------------------------------------------------------------------------
@FUZZ
@given(
    messages=st.lists(
        st.tuples(st.lists(st.binary(max_size=5), min_size=1, max_size=3), st.booleans()),
        max_size=6,
    ),
    takes=st.lists(st.integers(0, 9), max_size=40),
    max_buffers=st.integers(1, 4),
)
def test_the_outbox_sends_in_order_with_each_attachment_on_its_first_byte(
    messages: list[tuple[list[bytes], bool]], takes: list[int], max_buffers: int
) -> None:
    """Whatever the kernel takes of each batch: the bytes go out in order, each message's
    attachment goes with a sendmsg() that starts at that message's first byte, exactly
    once, and no sendmsg() carries the start of a later message with it."""
    from udskit.proto.outbox import Outbox

    outbox: Outbox[int] = Outbox(1 << 20, 0)
    starts: dict[int, int] = {}  # attachment -> stream offset of its message
    offset = 0
    for index, (buffers, attached) in enumerate(messages):
        if attached and b"".join(buffers):
            starts[index] = offset
            outbox.push(buffers, index)
        else:
            outbox.push(buffers)
        offset += len(b"".join(buffers))
    wire = b""
    went: dict[int, int] = {}
    for take in [*takes, *[1 << 30] * (offset + 1)]:
        if not outbox:
            break
        views, attachment = outbox.batch(max_buffers)
        batch = b"".join(bytes(v) for v in views)
        n = min(take, len(batch))
        if attachment is not None:
            assert len(wire) == starts[attachment]
            later = [s for s in starts.values() if len(wire) < s < len(wire) + len(batch)]
            assert not later, "a batch with descriptors runs into the next message that has some"
        got = outbox.sent(n)
        if n:
            assert got == attachment
            if got is not None:
                assert got not in went
                went[got] = len(wire)
        wire += batch[:n]
    assert wire == b"".join(b"".join(buffers) for buffers, _ in messages)
    assert went == starts
    assert outbox.size == 0
