"""Which message gets the descriptors of a read: the last one that starts within it.

Linux joins the tail of earlier messages and the skb carrying descriptors into one read,
and ends the read at that skb (see the docstring of udskit.proto.framing). These tests feed
the decoders the byte ranges such reads produce.
"""

from __future__ import annotations

import pytest

from udskit.proto import NEED_DATA, LengthPrefixed, Lines, Raw, make_framing


def _frames(framing: LengthPrefixed | Lines, *payloads: bytes) -> list[bytes]:
    return [b"".join(framing.encode(p)) for p in payloads]


def _drain(framing: LengthPrefixed | Lines | Raw) -> list[tuple[bytes, list[int]]]:
    out = []
    for _ in range(100):
        message = framing.next_message()
        if message is NEED_DATA:
            return out
        assert isinstance(message, bytes)
        out.append((message, framing.take_fds()))
    raise AssertionError("decoder never asked for more data")


@pytest.mark.parametrize("name", ["length", "lines"])
def test_a_read_joining_an_earlier_tail_gives_the_fds_to_the_message_it_starts(name: str) -> None:
    framing = make_framing(name)
    assert isinstance(framing, (LengthPrefixed, Lines))
    a, b = _frames(framing, b"A" * 10, b"B" * 10)
    framing.receive_data(a[:5])
    framing.receive_data(a[5:] + b, fds=[7])  # tail of A, then B with its descriptor
    assert _drain(framing) == [(b"A" * 10, []), (b"B" * 10, [7])]


@pytest.mark.parametrize("name", ["length", "lines"])
def test_fds_wait_until_the_message_started_in_their_read_is_complete(name: str) -> None:
    framing = make_framing(name)
    assert isinstance(framing, (LengthPrefixed, Lines))
    a, b = _frames(framing, b"A" * 10, b"B" * 10)
    framing.receive_data(a + b[:3], fds=[9])  # the read ends inside B's first bytes
    assert _drain(framing) == [(b"A" * 10, [])]
    framing.receive_data(b[3:])
    assert _drain(framing) == [(b"B" * 10, [9])]


def test_one_read_with_several_messages_gives_the_fds_to_the_last_that_starts_in_it() -> None:
    framing = LengthPrefixed()
    a, b, c = _frames(framing, b"a", b"bb", b"ccc")
    framing.receive_data(a + b + c, fds=[3, 4])
    assert _drain(framing) == [(b"a", []), (b"bb", []), (b"ccc", [3, 4])]


def test_fds_of_successive_reads_stay_with_their_own_messages() -> None:
    framing = LengthPrefixed()
    a, b = _frames(framing, b"a" * 100, b"b" * 100)
    framing.receive_data(a[:50], fds=[5])
    framing.receive_data(a[50:] + b[:10], fds=[6])
    framing.receive_data(b[10:])
    assert _drain(framing) == [(b"a" * 100, [5]), (b"b" * 100, [6])]


def test_unclaimed_fds_are_returned_by_held_fds() -> None:
    framing = LengthPrefixed()
    (a,) = _frames(framing, b"a" * 10)
    framing.receive_data(a[:6], fds=[11])
    assert _drain(framing) == []
    assert framing.held_fds() == [11]
    assert framing.held_fds() == []


def test_a_payload_read_straight_after_its_header_keeps_the_header_fds() -> None:
    framing = LengthPrefixed()
    payload = b"p" * 1000
    framing.receive_data(b"".join(framing.encode(payload))[:4], fds=[12])
    assert framing.next_message() is NEED_DATA
    assert framing.header_only() == len(payload)
    assert framing.receive_payload(payload) is payload  # the very object: no copy
    assert framing.take_fds() == [12]


def test_a_payload_completed_in_its_own_object_keeps_the_fds_of_its_first_part() -> None:
    framing = LengthPrefixed()
    payload = b"<" + b"p" * 998 + b">"
    framing.receive_data(b"".join(framing.encode(payload))[:104], fds=[14])
    assert framing.next_message() is NEED_DATA
    assert framing.partial() == (1000, 100)
    message = bytearray(1000)
    framing.copy_partial(memoryview(message))
    message[100:] = payload[100:]
    whole = bytes(message)
    assert framing.receive_rest(whole) is whole  # the very object: no copy
    assert whole == payload
    assert framing.take_fds() == [14]
    assert framing.partial() == (0, 0)
    assert framing.buffered == 0


def test_raw_framing_gives_fds_to_the_chunk_they_came_with() -> None:
    framing = Raw()
    framing.receive_data(b"xyz", fds=[13])
    assert _drain(framing) == [(b"xyz", [13])]
