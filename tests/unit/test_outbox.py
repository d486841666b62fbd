"""The sans-IO outbox: order, partial sends, attachments, watermarks, clearing."""

from __future__ import annotations

import pytest

from udskit.proto.outbox import IOV_MAX, Outbox


def joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(view) for view in views)


def drain(outbox: Outbox[str], step: int) -> tuple[bytes, list[tuple[int, str]]]:
    """Send everything ``step`` bytes at a time; return the bytes in the order they went and
    (offset, attachment) for every attachment reported."""
    out = bytearray()
    attachments: list[tuple[int, str]] = []
    while outbox:
        views, _ = outbox.batch()
        data = joined(views)[:step]
        attachment = outbox.sent(len(data))
        if attachment is not None:
            attachments.append((len(out), attachment))
        out += data
    return bytes(out), attachments


def test_empty_outbox() -> None:
    outbox: Outbox[str] = Outbox(10, 5)
    assert not outbox
    assert outbox.size == 0
    assert outbox.batch() == ([], None)
    assert outbox.sent(0) is None
    assert outbox.clear() == []


def test_order_is_kept_across_messages_and_buffers() -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    outbox.push([b"ab", b"cd"])
    outbox.push([b"ef"])
    outbox.push([memoryview(b"ghij")[1:3]])
    assert outbox.size == 8
    views, attachment = outbox.batch()
    assert attachment is None
    assert joined(views) == b"abcdefhi"


def test_empty_buffers_are_skipped() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    outbox.push([b"", b"x", b""])
    outbox.push([b""])
    views, _ = outbox.batch()
    assert [bytes(view) for view in views] == [b"x"]
    assert outbox.size == 1


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 100])
def test_partial_sends_resume_where_they_stopped(step: int) -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    messages = [b"first", b"second message", b"3", b"the fourth one"]
    for message in messages:
        outbox.push([message[:2], message[2:]])
    data, attachments = drain(outbox, step)
    assert data == b"".join(messages)
    assert attachments == []
    assert outbox.size == 0
    assert not outbox


def test_size_follows_partial_sends() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    outbox.push([b"0123456789"])
    outbox.sent(3)
    assert outbox.size == 7
    views, _ = outbox.batch()
    assert joined(views) == b"3456789"


def test_batch_is_limited_to_max_buffers() -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    for number in range(IOV_MAX + 10):
        outbox.push([b"%d," % number])
    views, _ = outbox.batch()
    assert len(views) == IOV_MAX
    views, _ = outbox.batch(3)
    assert joined(views) == b"0,1,2,"


def test_an_attachment_starts_a_batch_of_its_own() -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    outbox.push([b"plain"])
    outbox.push([b"head", b"body"], "fds")
    outbox.push([b"after"])
    # The batch before stops short of the message with the attachment.
    views, attachment = outbox.batch()
    assert (joined(views), attachment) == (b"plain", None)
    assert outbox.sent(5) is None
    # That message's first buffer goes alone, with its attachment.
    views, attachment = outbox.batch()
    assert (joined(views), attachment) == (b"head", "fds")
    # Descriptors go with a sendmsg's first byte: reported once, on the first partial send.
    assert outbox.sent(1) == "fds"
    views, attachment = outbox.batch()
    assert attachment is None
    assert joined(views) == b"eadbodyafter"
    assert outbox.sent(3) is None


def test_two_attachments_in_a_row_each_get_a_batch() -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    outbox.push([b"one"], "A")
    outbox.push([b"two"], "B")
    data, attachments = drain(outbox, 100)
    assert data == b"onetwo"
    assert attachments == [(0, "A"), (3, "B")]


@pytest.mark.parametrize("step", [1, 2, 4, 100])
def test_attachments_are_reported_at_their_message_start(step: int) -> None:
    outbox: Outbox[str] = Outbox(1 << 20, 0)
    outbox.push([b"xx"])
    outbox.push([b"yyyy", b"zz"], "first")
    outbox.push([b"w"])
    outbox.push([b"vvv"], "second")
    data, attachments = drain(outbox, step)
    assert data == b"xxyyyyzzwvvv"
    assert attachments == [(2, "first"), (9, "second")]


def test_watermarks_full_and_drained() -> None:
    outbox: Outbox[str] = Outbox(10, 4)
    assert outbox.drained
    assert not outbox.full
    outbox.push([b"x" * 10])
    assert not outbox.full, "at the high watermark is not above it"
    assert not outbox.drained
    outbox.push([b"y"])
    assert outbox.full
    outbox.sent(6)
    assert outbox.size == 5
    assert not outbox.full
    assert not outbox.drained, "between the watermarks: neither"
    outbox.sent(1)
    assert outbox.drained, "at the low watermark"


def test_clear_returns_unsent_attachments_only() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    outbox.push([b"a"], "gone")
    outbox.push([b"b"])
    outbox.push([b"c", b"d"], "kept-1")
    outbox.push([b"e"], "kept-2")
    assert outbox.sent(1) == "gone"
    assert outbox.clear() == ["kept-1", "kept-2"]
    assert outbox.size == 0
    assert not outbox
    assert outbox.batch() == ([], None)


def test_clear_after_a_partial_send_of_an_attachment() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    outbox.push([b"abcdef"], "fds")
    assert outbox.sent(2) == "fds"
    assert outbox.clear() == [], "the kernel has the descriptors already"


def test_bytearray_is_copied_on_push() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    buffer = bytearray(b"before")
    outbox.push([buffer, memoryview(buffer)[:3]])
    buffer[:] = b"AFTER!"
    views, _ = outbox.batch()
    assert joined(views) == b"beforebef"


def test_bytes_are_not_copied_and_views_are_cast_to_bytes() -> None:
    outbox: Outbox[str] = Outbox(100, 0)
    data = b"\x01\x00\x02\x00"
    outbox.push([memoryview(data).cast("H")])
    views, _ = outbox.batch()
    assert views[0].format == "B"
    assert views[0].obj is data
    assert outbox.size == 4
    assert bytes(views[0]) == data


@pytest.mark.parametrize(("high", "low"), [(10, 11), (10, -1), (-1, -1)])
def test_bad_watermarks_are_refused(high: int, low: int) -> None:
    with pytest.raises(ValueError, match="0 <= low <= high"):
        Outbox(high, low)


def test_equal_watermarks_are_accepted() -> None:
    outbox: Outbox[str] = Outbox(0, 0)
    assert outbox.drained
    outbox.push([b"x"])
    assert outbox.full
