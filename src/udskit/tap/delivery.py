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

__all__ = ["GATHER", "MAX_PENDING_BYTES", "MAX_PENDING_EVENTS", "Delivery"]

log = logging.getLogger("udskit")

#: Events waiting for the handler at most: a burst of small messages (a few MiB of
#: records), then the relay waits for the handler.
MAX_PENDING_EVENTS: Final = 4096

#: Payload bytes waiting for the handler at most: sixteen of the relay's reads (READ_SIZE),
#: so that a burst of large reads streams on while the handler catches up.
MAX_PENDING_BYTES: Final = 4 * 1024 * 1024

#: Once woken by an event, how long the thread lets more gather before it takes them. Waking
#: a thread for every read of a fast stream (thousands a second) made the relay's own
#: thread wait for the wake-ups and the GIL: measured with benchmarks/tap.py, tapped
#: throughput was 0.6x what the same relay did calling the handler inline; gathering for a
#: millisecond costs a display nothing a person sees, and a queue that fills ends it early.
GATHER: Final = 0.001


class Delivery:
    """A bounded queue of events and the thread that hands them to ``handler``.

    Woken by the first event after it was idle, the thread lets more gather for
    :data:`GATHER`, then takes everything queued at once, and wakes a waiting relay thread
    only when that batch is done: one lock round and at most two wake-ups per batch, not
    per event.
    """

    def __init__(self, handler: Callable[[Event], None]) -> None:
        self._handler = handler
        self._pending: deque[Event] = deque()
        self._bytes = 0  # payload bytes queued or in the batch being handled
        self._events = 0  # events queued or in the batch being handled
        self._idle = False  # the thread waits for events
        self._waiting = 0  # relay threads waiting for room
        self._closed = False
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # events for the thread
        self._room = threading.Condition(self._lock)  # room for the relay, or all handled
        self._thread = threading.Thread(target=self._run, name="udskit-tap-events", daemon=True)
        self._thread.start()

    def put(self, event: Event) -> None:
        """Queue ``event``; wait while the queue is full (never drops one)."""
        size = len(event.data) if isinstance(event, Data) else 0
        with self._lock:
            # An event larger than the byte bound still goes in once nothing is pending.
            while self._events and (
                self._events >= MAX_PENDING_EVENTS or self._bytes >= MAX_PENDING_BYTES
            ):
                self._waiting += 1
                self._ready.notify()  # a thread gathering events: take them now
                self._room.wait()
                self._waiting -= 1
            self._pending.append(event)
            self._bytes += size
            self._events += 1
            if self._idle:
                self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._idle = True
                    self._ready.wait()
                    self._idle = False
                if not self._pending:
                    return
                if not self._closed and not self._waiting:
                    self._ready.wait(GATHER)  # not idle: puts do not wake us meanwhile
                batch, self._pending = self._pending, deque()
            handled = 0
            try:
                for event in batch:
                    try:
                        self._handler(event)
                    except Exception:
                        log.exception("tap: the event handler failed")
                    if isinstance(event, Data):
                        handled += len(event.data)
            finally:
                with self._lock:
                    self._bytes -= handled
                    self._events -= len(batch)
                    self._room.notify_all()

    def close(self) -> None:
        """Handle what is queued, then end the thread."""
        with self._lock:
            self._closed = True
            self._ready.notify()
        self._thread.join()
