"""Fixtures for the tap's tests: a tap started in this process that is always stopped."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from udskit import tap


class Recorder:
    """Collects a tap's events; ``wait_for`` blocks (bounded) until a condition holds."""

    def __init__(self) -> None:
        self.events: list[tap.Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: tap.Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, test: Callable[[list[tap.Event]], bool], timeout: float = 20.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: test(self.events), timeout), self.events

    def of(self, kind: type) -> list[tap.Event]:
        with self._changed:
            return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def tapping() -> Iterator[Callable[..., tuple[tap.Tap, Recorder]]]:
    """``tapping(path, **options)``: a started tap and its recorder; stopped at the end."""
    started: list[tap.Tap] = []

    def start(path: Path, **options: object) -> tuple[tap.Tap, Recorder]:
        recorder = Recorder()
        running = tap.start(path, recorder, **options)  # type: ignore[arg-type]
        started.append(running)
        return running, recorder

    try:
        yield start
    finally:
        for running in started:
            with contextlib.suppress(Exception):
                running.stop(grace=5.0)
