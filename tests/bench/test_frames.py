"""The baseline's hand-written framing: whole frames out of any split of the bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udskit.bench.contenders.frames import READ_CHUNK, FrameReader, frame


def _feeder(data: bytes, cuts: list[int]) -> Callable[[memoryview], int]:
    """A read_into that hands out ``data`` in pieces of the given sizes (then the rest)."""
    position = 0
    pieces = iter(cuts)

    def read_into(view: memoryview) -> int:
        nonlocal position
        want = next(pieces, len(data))
        size = min(max(want, 1), len(view), len(data) - position)
        view[:size] = data[position : position + size]
        position += size
        return size

    return read_into


def _all(reader: FrameReader) -> list[bytes]:
    out = []
    while (message := reader.read()) is not None:
        out.append(bytes(message))
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(1, 700), max_size=60),
)
def test_any_split_gives_back_the_messages(messages: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(m) for m in messages)
    assert _all(FrameReader(_feeder(data, cuts))) == messages


def test_frames_larger_than_the_buffer_are_read_whole() -> None:
    big = bytes(range(256)) * (3 * READ_CHUNK // 256 + 7)
    messages = [b"small", big, b"", big[:10]]
    data = b"".join(frame(m) for m in messages)
    assert _all(FrameReader(_feeder(data, [100, 5000, 70_000] * 20))) == messages


def test_many_small_frames_wrap_around_the_buffer() -> None:
    messages = [bytes([i % 251]) * (i % 97) for i in range(20_000)]
    data = b"".join(frame(m) for m in messages)
    assert _all(FrameReader(_feeder(data, [READ_CHUNK - 3, 11, 4099] * 400))) == messages


@pytest.mark.parametrize("cut", [1, 3, 6])
def test_end_of_stream_mid_frame_is_an_error(cut: int) -> None:
    data = frame(b"hello")[:-1]
    reader = FrameReader(_feeder(data, [cut] * 10))
    with pytest.raises(EOFError, match="middle of a frame"):
        _all(reader)
