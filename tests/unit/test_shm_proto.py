"""The shared-memory protocol, bytes only (``udskit.proto.shm`` and the framing's records)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udskit import ConnectionClosed, FrameTooLarge, ProtocolError
from udskit.proto import CLOSED, NEED_DATA, Control, LengthPrefixed
from udskit.proto.shm import (
    ATTACH,
    CONTROL_BIT,
    DEFAULT_POOL,
    HELLO,
    MARKER_PREFIX,
    MAX_POOL,
    OFFER,
    PAGE,
    RECORD_PACKET_MAX,
    RECORD_SIZE,
    RECORDS_PER_PACKET,
    RELEASE,
    SHARED_THRESHOLD,
    SLOT,
    SWITCHED,
    TAG_MESSAGE,
    TAG_RECORDS,
    VERSION,
    Ledger,
    PacketWire,
    Pool,
    Record,
    check_pool_size,
    check_record,
    decode_record,
    encode_packet,
    encode_record,
    hello_packet,
    is_marker,
)


def test_record_round_trip() -> None:
    encoded = encode_record(SLOT, 8192, 12345)
    assert len(encoded) == 4 + RECORD_SIZE
    assert int.from_bytes(encoded[:4], "big") == CONTROL_BIT | RECORD_SIZE
    assert decode_record(encoded[4:]) == Record(SLOT, 8192, 12345)
    assert "SLOT" in repr(decode_record(encoded[4:]))


@pytest.mark.parametrize(
    "body",
    [b"", b"\x03" * (RECORD_SIZE - 1), b"\x03" * (RECORD_SIZE + 1), b"\x09" + bytes(16)],
)
def test_bad_record_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_record(body)


def test_framing_hands_records_out_only_when_asked() -> None:
    stream = b"\x00\x00\x00\x02hi" + encode_record(RELEASE, 4096) + b"\x00\x00\x00\x01!"
    framing = LengthPrefixed(1024, records=True)
    out = [framing.feed(stream)]
    while (item := framing.next_message()) is not NEED_DATA:
        out.append(item)
    assert out[0] == b"hi"
    assert isinstance(out[1], Control)
    assert decode_record(out[1].body) == Record(RELEASE, 4096, 0)
    assert out[2] == b"!"
    # A channel that did not opt in: the record header is a frame over max_frame.
    plain = LengthPrefixed(1024)
    assert plain.feed(b"\x00\x00\x00\x02hi") == b"hi"
    with pytest.raises(FrameTooLarge):
        plain.feed(encode_record(RELEASE, 4096))


def test_framing_takes_a_read_of_exactly_one_record_whole() -> None:
    """The usual case, a read holding one record and nothing else, between messages and
    with nothing buffered. A record over the limit is not waited for: it comes as an empty
    body, which decode_record refuses (the channel closes), and nothing after it is decoded."""
    framing = LengthPrefixed(1024, records=True)
    for record in (encode_record(SLOT, 4096, 1), encode_record(RELEASE, 4096)):
        got = framing.feed(record)
        assert isinstance(got, Control)
        assert encode_record(*decode_record(got.body)) == record
        assert framing.buffered == 0
        assert framing.feed(b"\x00\x00\x00\x02hi") == b"hi"
    huge = (CONTROL_BIT | 300).to_bytes(4, "big") + bytes(300)
    got = framing.feed(huge[:10])  # not waited for
    assert isinstance(got, Control)
    with pytest.raises(ProtocolError, match=r"record of 0 bytes, or over the limit \(expected"):
        decode_record(got.body)
    with pytest.raises(ProtocolError, match="record of 300 bytes"):
        framing.feed(huge[10:])


@given(st.integers(min_value=1, max_value=4 + RECORD_SIZE - 1))
def test_framing_waits_for_a_whole_record(cut: int) -> None:
    record = encode_record(SLOT, 0, 1)
    framing = LengthPrefixed(1024, records=True)
    assert framing.feed(record[:cut]) is NEED_DATA
    got = framing.feed(record[cut:])
    assert isinstance(got, Control)
    assert decode_record(got.body) == Record(SLOT, 0, 1)


def test_framing_refuses_a_huge_record_and_a_cut_one() -> None:
    framing = LengthPrefixed(1024, records=True)
    got = framing.feed((CONTROL_BIT | 100_000).to_bytes(4, "big"))  # a body no record has
    assert isinstance(got, Control)
    assert got.body == b""
    with pytest.raises(ProtocolError, match="record of 100000 bytes"):
        framing.next_message()  # nothing after it is decoded
    cut = LengthPrefixed(1024, records=True)
    cut.feed(encode_record(SLOT, 0, 1)[:10])
    with pytest.raises(ConnectionClosed, match="mid-message"):
        cut.feed(b"")
    clean = LengthPrefixed(1024, records=True)
    assert clean.feed(b"") is CLOSED


def test_records_need_max_frame_below_the_control_bit() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        LengthPrefixed(CONTROL_BIT, records=True)


def test_pool_first_fit_reuses_low_pages_and_merges() -> None:
    pool = Pool(16 * PAGE)
    a = pool.allocate(1)
    b = pool.allocate(PAGE + 1)
    c = pool.allocate(4 * PAGE)
    assert (a, b, c) == (0, PAGE, 3 * PAGE)
    assert pool.in_use == 7 * PAGE
    assert pool.allocate(10 * PAGE) is None  # 9 pages free: backpressure, not growth
    pool.release(b)
    assert pool.allocate(2 * PAGE) == PAGE  # the freed extent is reused first
    pool.release(PAGE)
    pool.release(a)
    pool.release(c)
    assert pool.in_use == 0
    assert pool.allocate(16 * PAGE) == 0  # everything merged back into one extent
    assert not pool.fits(17 * PAGE)
    assert not pool.fits(0)


def test_pool_refuses_a_release_of_what_it_did_not_lend() -> None:
    pool = Pool(4 * PAGE)
    offset = pool.allocate(PAGE)
    assert offset is not None
    with pytest.raises(ProtocolError, match="not lent"):
        pool.release(PAGE)
    pool.release(offset)
    with pytest.raises(ProtocolError, match="not lent"):
        pool.release(offset)  # twice


@given(st.lists(st.integers(min_value=1, max_value=5 * PAGE), max_size=40), st.randoms())
def test_pool_never_lends_overlapping_extents(sizes: list[int], rnd: object) -> None:
    pool = Pool(32 * PAGE)
    lent: dict[int, int] = {}
    for size in sizes:
        offset = pool.allocate(size)
        if offset is None:
            victim = next(iter(lent))
            pool.release(victim)
            del lent[victim]
            continue
        end = offset + size
        assert end <= pool.size
        for other, length in lent.items():
            assert end <= other or other + length <= offset
        lent[offset] = size


def test_ledger_checks_every_slot() -> None:
    ledger = Ledger(16 * PAGE, max_frame=4 * PAGE)
    ledger.accept(0, 100)
    with pytest.raises(ProtocolError, match="overlaps"):
        ledger.accept(0, 10)
    with pytest.raises(FrameTooLarge) as over:
        ledger.accept(PAGE, 4 * PAGE + 1)
    assert str(over.value) == (
        f"peer announced a shared-memory message of {4 * PAGE + 1} bytes, over max_frame "
        f"({4 * PAGE} bytes): give this end the peer's max_frame"
    )
    with pytest.raises(ProtocolError, match="message of 0 bytes"):
        ledger.accept(PAGE, 0)
    with pytest.raises(ProtocolError, match="outside"):
        ledger.accept(15 * PAGE, 2 * PAGE)
    with pytest.raises(ProtocolError, match="outside"):
        ledger.accept(PAGE + 1, 10)  # not on a page
    with pytest.raises(ProtocolError, match="outside"):
        ledger.accept(2**63, 10)
    ledger.release(0)
    ledger.accept(0, 4 * PAGE)


def test_check_record_order_and_descriptors() -> None:
    check_record(Record(OFFER, VERSION, 0), 0, peer_opted=False)
    with pytest.raises(ProtocolError, match="only a listener"):
        check_record(Record(OFFER, VERSION, 0), 0, peer_opted=True)
    with pytest.raises(ProtocolError, match="version"):
        check_record(Record(OFFER, VERSION + 1, 0), 0, peer_opted=False)
    with pytest.raises(ProtocolError, match="before the listener's offer"):
        check_record(Record(SLOT, 0, 1), 0, peer_opted=False)
    check_record(Record(ATTACH, PAGE, 0), 1, peer_opted=True)
    for fds in (0, 2):
        with pytest.raises(ProtocolError, match="descriptors"):
            check_record(Record(ATTACH, PAGE, 0), fds, peer_opted=True)
    with pytest.raises(ProtocolError, match="descriptors"):
        check_record(Record(SLOT, 0, 1), 1, peer_opted=True)


def test_pool_size_option() -> None:
    assert check_pool_size(False) == 0
    assert check_pool_size(True) == DEFAULT_POOL
    assert check_pool_size(SHARED_THRESHOLD + 1) == SHARED_THRESHOLD + PAGE
    for bad in ("yes", 1.5, -1, 0, 100, SHARED_THRESHOLD - 1, MAX_POOL + 1):
        with pytest.raises(ValueError, match="shared_memory"):
            check_pool_size(bad)


def test_marker() -> None:
    assert is_marker(MARKER_PREFIX + b"0123")
    assert not is_marker(b"\0other")
    assert not is_marker("/tmp/x")
    assert not is_marker("")


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=3 * PAGE)
        ),
        max_size=60,
    )
)
def test_ledger_refuses_exactly_the_overlapping_slots(slots: list[tuple[int, int]]) -> None:
    ledger = Ledger(48 * PAGE, max_frame=4 * PAGE)
    held: dict[int, int] = {}
    for page, length in slots:
        offset = page * PAGE
        end = offset + -(-length // PAGE) * PAGE
        overlaps = any(o < end and offset < o + -(-n // PAGE) * PAGE for o, n in held.items())
        if overlaps:
            with pytest.raises(ProtocolError, match="overlaps"):
                ledger.accept(offset, length)
            victim = next(iter(held))
            ledger.release(victim)
            del held[victim]
        else:
            ledger.accept(offset, length)
            held[offset] = length
    assert ledger.held == held


# -- seqpacket: PacketWire ------------------------------------------------------------------------

MARKER = MARKER_PREFIX + b"0123456789abcdef"


def test_a_pair_is_tagged_both_ways_from_the_start() -> None:
    wire = PacketWire("pair")
    assert wire.tag_out
    assert wire.tag_in
    assert not wire.switch_pending
    assert wire.incoming(TAG_MESSAGE, memoryview(b"abc")) == b"abc"
    records = [(SLOT, 0, 5), (RELEASE, PAGE, 0)]
    got = wire.incoming(TAG_RECORDS, memoryview(encode_packet(records)))
    assert [decode_record(body) for body in got] == [Record(*r) for r in records]  # type: ignore[union-attr]


def test_listener_and_client_switch_with_the_hello() -> None:
    listener, client = PacketWire("listener", MARKER), PacketWire("client", MARKER)
    hello = hello_packet(MARKER)
    assert hello.startswith(HELLO)
    assert listener.hello == client.hello == hello
    assert listener.switch_pending  # the listener's hello goes first of all
    assert not client.tag_out
    assert not client.tag_in
    # Before the hello arrives, the listener reads the client's packets as plain.
    assert listener.incoming(None, memoryview(b"\x01early")) == b"\x01early"
    listener.switched()
    assert listener.tag_out
    assert client.incoming(None, memoryview(hello)) is SWITCHED
    assert client.tag_in
    assert client.switch_pending  # the client's hello goes before its next packet
    client.switched()
    assert listener.incoming(None, memoryview(hello)) is SWITCHED
    assert listener.tag_in
    # Once tagged, a hello is no message and no tag.
    with pytest.raises(ProtocolError, match="tag 255"):
        listener.incoming(hello[0], memoryview(hello[1:]))


def test_a_client_whose_first_packet_is_not_the_hello_stays_plain() -> None:
    client = PacketWire("client", MARKER)
    other = hello_packet(MARKER_PREFIX + b"fedcba9876543210")
    assert client.incoming(None, memoryview(other)) == other  # another connection's
    assert client.decided
    assert client.incoming(None, memoryview(hello_packet(MARKER))) == hello_packet(MARKER)
    assert not client.tag_in
    assert not client.switch_pending
    client.check_plain(hello_packet(MARKER))  # decided: nothing can be misread any more


def test_the_plain_message_a_client_may_not_send_before_deciding() -> None:
    client = PacketWire("client", MARKER)
    with pytest.raises(ProtocolError, match="hello"):
        client.check_plain(hello_packet(MARKER))
    client.check_plain(hello_packet(MARKER)[:-1])
    client.check_plain(b"anything else")


def test_the_hello_is_refused_in_any_shape_and_until_ours_went() -> None:
    client = PacketWire("client", MARKER)
    hello = hello_packet(MARKER)
    rows = memoryview(bytearray(hello)).cast("B", shape=[5, len(hello) // 5])
    assert len(rows) == 5  # len() counts rows, the socket sends all 35 bytes
    with pytest.raises(ProtocolError, match="hello"):
        client.check_plain(rows)
    with pytest.raises(ProtocolError, match="hello"):  # another version: it would close
        client.check_plain(hello_packet(MARKER, version=2))
    # The reader takes the listener's hello while another thread is about to send a
    # plain packet: until our hello has gone, the listener still reads plain packets.
    assert client.incoming(None, memoryview(hello)) is SWITCHED
    with pytest.raises(ProtocolError, match="hello"):
        client.check_plain(hello)
    client.switched()
    client.check_plain(hello)  # tagged from now on: never misread


def test_a_lost_first_packet_decides_that_the_listener_did_not_opt_in() -> None:
    client = PacketWire("client", MARKER)
    client.lost()  # truncated, or descriptors refused: no hello is either
    assert client.decided
    assert client.incoming(None, memoryview(hello_packet(MARKER))) == hello_packet(MARKER)
    assert not client.tag_in
    pair = PacketWire("pair")
    pair.lost()
    assert pair.tag_in


def test_a_hello_of_another_version_is_refused() -> None:
    client = PacketWire("client", MARKER)
    with pytest.raises(ProtocolError, match="version 2"):
        client.incoming(None, memoryview(hello_packet(MARKER, version=2)))


@pytest.mark.parametrize(
    ("tag", "body", "match"),
    [
        (TAG_MESSAGE, b"", "empty tagged message"),
        (TAG_RECORDS, b"", "records packet of 0 bytes"),
        (TAG_RECORDS, bytes(RECORD_SIZE + 1), "records packet of 18 bytes"),
        (TAG_RECORDS, bytes(RECORD_PACKET_MAX + RECORD_SIZE), "records packet"),
        (2, b"x", "unknown shared-memory tag 2"),
    ],
)
def test_bad_tagged_packets(tag: int, body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        PacketWire("pair").incoming(tag, memoryview(body))


def test_records_per_packet_and_roles() -> None:
    with pytest.raises(AssertionError):
        encode_packet([(RELEASE, 0, 0)] * (RECORDS_PER_PACKET + 1))
    assert len(encode_packet([(RELEASE, 0, 0)] * RECORDS_PER_PACKET)) == RECORD_PACKET_MAX
    with pytest.raises(ValueError, match="role"):
        PacketWire("server")
