"""What a contender is: a name, what it measures, where its peer code lives, what it runs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from ..plan import Test
from ..wire import Option

__all__ = ["Contender", "Transport", "missing_module"]

#: How the two peers meet: a socket path, TCP loopback, or a pair of inherited pipes.
Transport: TypeAlias = Literal["unix", "tcp", "pipe"]


@dataclass(frozen=True, slots=True)
class Contender:
    """One way of moving messages between two processes, measured side by side.

    ``module`` holds the peer roles (``rtt_server``, ``rtt_client``, ``stream_receiver``,
    ``stream_sender``, ``echo_server``) for Python peers, or ``command(job)`` for a native
    one. ``skips`` says, per test it does not run, why not. ``requires`` returns None when
    the contender can run here, else the reason it cannot (shown in the table).
    """

    name: str
    label: str
    description: str
    module: str
    transport: Transport
    skips: Mapping[Test, str] = field(default_factory=dict)
    options: Mapping[str, Option] = field(default_factory=dict)
    requires: Callable[[], str | None] = lambda: None
    native: bool = False
    #: Runs the large-message test (the shared-memory rows and their references only).
    large: bool = False

    def runs(self, test: Test) -> bool:
        return test not in self.skips


def missing_module(module: str, install: str) -> Callable[[], str | None]:
    """A ``requires`` check: the reason if ``module`` cannot be imported here."""

    def check() -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"{module} is not installed ({install})"

    return check
