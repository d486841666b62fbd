"""bridge.run() takes SIGINT and SIGTERM only while it runs (as udskit.aio.serve() does,
through the same udskit.aio.signals): the handlers that were there before come back."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import pytest

from udskit import bridge


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_run_gives_back_the_signal_handlers_it_took(sockdir: Path, stop_with: int) -> None:
    def ours(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("the bridge's handler should have had this signal")

    before = {signum: signal.signal(signum, ours) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        bridge.run(
            str(sockdir / "front.sock"),
            str(sockdir / "target.sock"),
            started=lambda _: os.kill(os.getpid(), stop_with),
        )
        # It used to leave asyncio's defaults behind (SIG_DFL for SIGTERM).
        assert signal.getsignal(signal.SIGINT) is ours
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
    assert not (sockdir / "front.sock").exists()
