"""The handover conversation's messages, bytes only: every op round-trips, and every
malformed packet is a ProtocolError that says what was wrong (never another exception)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udskit.errors import ProtocolError
from udskit.proto.handover import (
    CARRIES_DESCRIPTOR,
    MAX_MESSAGE,
    VERSION,
    Message,
    decode,
    encode,
)

ALL_OPS = ("take", "listener", "ready", "stopped", "upgrade", "upgraded", "error")

MESSAGES = [
    Message("take", type="seqpacket", version=VERSION),
    Message("listener", type="dgram", pid=1234),
    Message("ready"),
    Message("stopped", pid=99),
    Message("upgrade"),
    Message("upgraded", pid=7, old=6),
    Message("error", reason="pid 12 is taking over /run/x.sock now; try again ✓"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.op)
def test_every_op_round_trips(message: Message) -> None:
    packet = encode(message)
    assert len(packet) <= MAX_MESSAGE
    descriptors = 1 if message.op in CARRIES_DESCRIPTOR else 0
    assert decode(packet, descriptors, ALL_OPS) == message


def test_encode_sends_only_the_fields_of_the_op() -> None:
    assert json.loads(encode(Message("ready", type="x", pid=3, reason="r", version=2))) == {
        "op": "ready"
    }
    assert encode(Message("stopped", pid=5)) == b'{"op":"stopped","pid":5}'


def test_fields_the_op_does_not_have_are_ignored() -> None:
    packet = b'{"op":"stopped","pid":5,"later":"a newer peer may say more"}'
    assert decode(packet, 1, ("stopped",)) == Message("stopped", pid=5)


def test_a_packet_of_exactly_the_limit_is_accepted() -> None:
    reason = "x" * (MAX_MESSAGE - len(encode(Message("error", reason=""))))
    packet = encode(Message("error", reason=reason))
    assert len(packet) == MAX_MESSAGE
    assert decode(packet, 0, ("error",)).reason == reason


def bad(packet: bytes, descriptors: int = 0, expected: tuple[str, ...] = ALL_OPS) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(packet, descriptors, expected)
    text = str(caught.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (b"", "the handover peer closed the conversation"),
        (b" " * (MAX_MESSAGE + 1), f"handover message of {MAX_MESSAGE + 1} bytes; the limit is"),
        (b"{", "handover message is not JSON"),
        (b'{"op":"ready"', "handover message is not JSON"),
        (b"\xc3\x28", "handover message is not JSON"),
        (b'{"op":"ready"}\x00', "handover message is not JSON"),
        (b"NaN", "handover message is not an object with an op"),
        (b"[" * 3000 + b"]" * 3000, "handover message is not JSON"),
        (b'{"op":' * 1000 + b"1" + b"}" * 1000, "handover message is not JSON"),
        (b'"ready"', "handover message is not an object with an op"),
        (b"null", "handover message is not an object with an op"),
        (b'["op","ready"]', "handover message is not an object with an op"),
        (b"{}", "handover message is not an object with an op"),
        (b'{"op":null}', "handover message is not an object with an op"),
        (b'{"op":["ready"]}', "handover message is not an object with an op"),
        (b'{"op":"READY"}', "unknown handover op 'READY'"),
        (b'{"op":"' + b"z" * 500 + b'"}', "unknown handover op 'zzzzzzzzzz"),
        (b'{"op":"take","type":"stream"}', "handover 'take' message lacks a valid 'version'"),
        (b'{"op":"take","version":1}', "handover 'take' message lacks a valid 'type'"),
        (b'{"op":"take","version":1.0,"type":"stream"}', "lacks a valid 'version'"),
        (b'{"op":"take","version":false,"type":"stream"}', "lacks a valid 'version'"),
        (b'{"op":"take","version":1,"type":["stream"]}', "lacks a valid 'type'"),
        (b'{"op":"stopped","pid":"12"}', "handover 'stopped' message lacks a valid 'pid'"),
        (b'{"op":"stopped","pid":true}', "lacks a valid 'pid'"),
        (b'{"op":"stopped","pid":1e3}', "lacks a valid 'pid'"),
        (b'{"op":"error"}', "handover 'error' message lacks a valid 'reason'"),
        (b'{"op":"error","reason":7}', "lacks a valid 'reason'"),
        (b'{"op":"take","version":' + b"9" * 5000 + b"}", "handover message is not JSON"),
    ],
)
def test_malformed_packets(packet: bytes, error: str) -> None:
    assert error in bad(packet)


def test_a_long_unknown_op_is_cut_short_in_the_error() -> None:
    assert len(bad(b'{"op":"' + b"q" * 2000 + b'"}')) < 80


def test_an_op_out_of_turn() -> None:
    assert bad(b'{"op":"ready"}', 0, ("take", "upgrade")) == (
        "handover op 'ready' out of turn (expected take or upgrade)"
    )


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.op)
@pytest.mark.parametrize("descriptors", [0, 1, 2])
def test_descriptors_only_with_the_listener(message: Message, descriptors: int) -> None:
    """The listener comes with the listening socket, ``stopped`` with the handover socket;
    nothing else carries a descriptor."""
    assert set(CARRIES_DESCRIPTOR) == {"listener", "stopped"}
    wanted = 1 if message.op in CARRIES_DESCRIPTOR else 0
    if descriptors == wanted:
        assert decode(encode(message), descriptors, ALL_OPS) == message
    else:
        assert bad(encode(message), descriptors) == (
            f"handover {message.op!r} message came with {descriptors} descriptors, not {wanted}"
        )


@given(st.binary(max_size=MAX_MESSAGE + 10), st.integers(0, 3))
def test_any_bytes_decode_or_raise_protocol_error(packet: bytes, descriptors: int) -> None:
    try:
        message = decode(packet, descriptors, ALL_OPS)
    except ProtocolError:
        return
    assert message.op in ALL_OPS


@settings(max_examples=60)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    ),
    st.sampled_from(ALL_OPS),
)
def test_any_json_with_an_op_decodes_or_raises_protocol_error(body: object, op: str) -> None:
    if isinstance(body, dict):
        body["op"] = op
    packet = json.dumps(body).encode()
    try:
        message = decode(packet, 1 if op == "listener" else 0, ALL_OPS)
    except ProtocolError:
        return
    assert message.op == op
    assert encode(message) == encode(decode(encode(message), 1 if op == "listener" else 0, (op,)))
