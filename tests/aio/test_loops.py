"""``udskit.aio.run`` and friends: uvloop when it is installed, the standard loop when it is
not or when asked; and the public surface of ``udskit.aio``."""

from __future__ import annotations

import asyncio
import sys

import pytest

import udskit
import udskit.aio


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_prefers_uvloop_when_installed() -> None:
    assert udskit.aio.uvloop_available()
    assert udskit.aio.run(loop_module()).startswith("uvloop")
    assert udskit.aio.run(loop_module(), use_uvloop=True).startswith("uvloop")
    assert udskit.aio.run(loop_module(), use_uvloop=False).startswith("asyncio")


def test_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import of a missing module sees
    assert not udskit.aio.uvloop_available()
    assert udskit.aio.run(loop_module()).startswith("asyncio")
    with pytest.raises(ImportError, match=r"pip install 'udskit\[fast\]'"):
        udskit.aio.run(loop_module(), use_uvloop=True)
    loop = udskit.aio.new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_run_returns_and_raises_what_main_does() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise udskit.ConnectionClosed("gone")

    assert udskit.aio.run(answer()) == 42
    with pytest.raises(udskit.ConnectionClosed, match="gone"):
        udskit.aio.run(fail(), use_uvloop=False)


def test_public_surface() -> None:
    assert udskit.aio.__all__ == [
        "Channel",
        "DatagramListener",
        "Listener",
        "MessageServer",
        "Server",
        "connect",
        "listen",
        "new_event_loop",
        "pair",
        "run",
        "serve",
        "serve_messages",
        "start_message_server",
        "start_server",
        "uvloop_available",
    ]
    for name in udskit.aio.__all__:
        assert getattr(udskit.aio, name) is not None
    assert "aio" not in udskit.__all__, "udskit.aio is a module of its own, not re-exported"
