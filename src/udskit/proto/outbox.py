"""The outbox: bytes a connection has accepted to send and the kernel has not taken yet.

Sans-IO: the driver (the asyncio channel, a message server) asks for the next ``batch()``
of buffers, hands them to one ``sendmsg()``, and reports how many bytes went with
``sent()``. The outbox keeps order, keeps track of partly sent buffers, and carries each
message's *attachment* (the descriptors passed with it, in whatever form the driver keeps
them) on that message's first buffer.

Attachments decide where a batch ends: a message with descriptors starts a ``sendmsg`` of its
own and nothing follows it there, because the kernel makes one skb of a sendmsg and the
receiver hands an skb's descriptors to the last message that starts in it (see
:mod:`udskit.proto.framing`); joining what follows would give them to a later message.

The watermarks are the backpressure rule: above ``high`` bytes the driver stops taking more
from its producer (the peer's reads, or an awaiting sender), and lets it go on once the
outbox has drained to ``low``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final, Generic, TypeVar

__all__ = ["IOV_MAX", "Outbox"]

#: Buffers per sendmsg(): Linux's IOV_MAX is 1024 (EMSGSIZE above it).
IOV_MAX: Final = 1024

_A = TypeVar("_A")


class Outbox(Generic[_A]):
    """Queued buffers in order, each message's attachment riding on its first buffer."""

    __slots__ = ("_items", "high", "low", "size")

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"outbox watermarks must satisfy 0 <= low <= high, not {low}, {high}")
        self.high = high
        self.low = low
        # [view, attachment or None] per buffer
        self._items: deque[list[object]] = deque()
        self.size = 0  # bytes queued (an attribute: read on every send)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def full(self) -> bool:
        """Above the high watermark: stop the producer."""
        return self.size > self.high

    @property
    def drained(self) -> bool:
        """At or below the low watermark: let the producer go on."""
        return self.size <= self.low

    def push(self, buffers: Iterable[memoryview | bytes], attachment: _A | None = None) -> None:
        """Queue one message's buffers. Views of ``bytes`` are kept as they are; any other
        buffer is copied, so the caller may reuse its bytearray at once."""
        first = True
        for buffer in buffers:
            view = memoryview(buffer)
            if not view.nbytes:
                continue
            if not isinstance(view.obj, bytes):
                view = memoryview(view.tobytes())
            elif view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._items.append([view, attachment if first else None])
            self.size += view.nbytes
            first = False

    def batch(self, max_buffers: int = IOV_MAX) -> tuple[list[memoryview], _A | None]:
        """The buffers for the next sendmsg(), and the attachment that must go with them."""
        items = self._items
        if not items:
            return [], None
        head = items[0]
        attachment: _A | None = head[1]  # type: ignore[assignment]
        views: list[memoryview] = [head[0]]  # type: ignore[list-item]
        if attachment is None:
            for index in range(1, min(len(items), max_buffers)):
                item = items[index]
                if item[1] is not None:
                    break  # an attachment starts a sendmsg of its own
                views.append(item[0])  # type: ignore[arg-type]
        return views, attachment

    def sent(self, count: int) -> _A | None:
        """``count`` bytes of the last batch went out; returns its attachment if any did
        (descriptors go with a sendmsg's first byte)."""
        if count <= 0:
            return None
        items = self._items
        attachment: _A | None = items[0][1]  # type: ignore[assignment]
        items[0][1] = None
        self.size -= count
        while count:
            view: memoryview = items[0][0]  # type: ignore[assignment]
            if count >= len(view):
                count -= len(view)
                items.popleft()
            else:
                items[0][0] = view[count:]
                count = 0
        return attachment

    def clear(self) -> list[_A]:
        """Drop everything queued; returns the attachments that never went out."""
        unsent = [item[1] for item in self._items if item[1] is not None]
        self._items.clear()
        self.size = 0
        return unsent  # type: ignore[return-value]
