"""The conformance suite (tests/integration/test_conformance.py), run over ``udskit.aio``.

Every test function of that module is collected here too, with the ``transport`` fixture
below in place of the blocking one: the same contract, on both event loops, for every socket
type and framing. A test added there runs here without any change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import open_fds
from ..integration import test_conformance as suite
from ..integration.conformance import Transport
from .transport import AIO_TRANSPORTS

ends = suite.ends
globals().update({name: value for name, value in vars(suite).items() if name.startswith("test_")})


@pytest.fixture(params=AIO_TRANSPORTS, ids=lambda make: make.__name__)
def transport(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[Transport]:
    """An asyncio transport, checked for descriptor leaks once its loop is closed."""
    make: Callable[[Path], Transport] = request.param
    before = open_fds()
    made = make(sockdir)
    try:
        yield made
    finally:
        made.teardown()
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"{made.id}: descriptors leaked: {sorted(leaked)}"
