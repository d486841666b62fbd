"""Events from the relay's threads to the caller's handler, in order, off the relay's path.

The relay hands each event over and goes on relaying; one thread calls the handler with
the events in the order they were handed over (per connection, the order the bytes went
through). The handler (formatting a line, writing a terminal or a capture file) never
adds its time to a round trip through the tap. What waits for it is bounded: past
:data:`MAX_PENDING_EVENTS` events or :data:`MAX_PENDING_BYTES` payload bytes the relay
waits (backpressure from the display, as from a slow peer), so a display that cannot keep
up slows the traffic down rather than making the tap's memory grow.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from .events import Data, Event

__all__ = ["MAX_PENDING_BYTES", "MAX_PENDING_EVENTS", "Delivery"]

log = logging.getLogger("udskit")

#: Events waiting for the handler at most: a burst of small messages (a few MiB of
#: records), then the relay waits for the handler.
MAX_PENDING_EVENTS: Final = 4096

#: Payload bytes waiting for the handler at most: sixteen of the relay's reads (READ_SIZE),
#: so that a burst of large reads streams on while the handler catches up.
MAX_PENDING_BYTES: Final = 4 * 1024 * 1024


class Delivery:
    """A bounded queue of events and the thread that hands them to ``handler``."""

    def __init__(self, handler: Callable[[Event], None]) -> None:
        self._handler = handler
        self._pending: deque[Event] = deque()
        self._bytes = 0
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="udskit-tap-events", daemon=True)
        self._thread.start()

    def put(self, event: Event) -> None:
        """Queue ``event``; wait while the queue is full (never drops one)."""
        size = len(event.data) if isinstance(event, Data) else 0
        with self._changed:
            self._changed.wait_for(self._has_room)
            self._pending.append(event)
            self._bytes += size
            self._changed.notify_all()

    def _has_room(self) -> bool:
        # An event larger than the byte bound still goes in once the queue is empty.
        return (
            self._closed
            or not self._pending
            or (len(self._pending) < MAX_PENDING_EVENTS and self._bytes < MAX_PENDING_BYTES)
        )

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                event = self._pending.popleft()
                self._busy = True
            try:
                self._handler(event)
            except Exception:
                log.exception("tap: the event handler failed")
            finally:
                with self._changed:
                    self._busy = False
                    if isinstance(event, Data):
                        self._bytes -= len(event.data)
                    self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every queued event has been handled."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending and not self._busy)

    def close(self) -> None:
        """Handle what is queued, then end the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()
