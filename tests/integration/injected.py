"""Injection points for races: run a move at the exact moment an attacker would need.

Tests queue moves; each runs once, inside udskit, at the point named, so a race that real
timing would hit one time in thousands is hit every time.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

from udskit import sockfile as sockfile_module

Moves = list[Callable[[], None]]


def after_look_at(monkeypatch: pytest.MonkeyPatch, name: bytes) -> Moves:
    """Moves to make right after udskit's next look (lstat) at ``name`` that finds a file:
    its last look before it removes that file (after the probe, or at release)."""
    moves: Moves = []
    real = sockfile_module._Directory.lstat

    def lstat(directory: object, *args: bytes) -> os.stat_result | None:
        found = real(directory, *args)  # type: ignore[arg-type]
        looked_at = args[0] if args else directory.name  # type: ignore[attr-defined]
        if looked_at == name and found is not None:
            while moves:
                moves.pop(0)()
        return found

    monkeypatch.setattr(sockfile_module._Directory, "lstat", lstat)
    return moves


def after_bind(monkeypatch: pytest.MonkeyPatch) -> Moves:
    """Moves to make right after the next bind() of an AF_UNIX socket returns."""
    return _at_bind(monkeypatch, before=False)


def before_bind(monkeypatch: pytest.MonkeyPatch) -> Moves:
    """Moves to make right before the next bind() of an AF_UNIX socket."""
    return _at_bind(monkeypatch, before=True)


def _at_bind(monkeypatch: pytest.MonkeyPatch, *, before: bool) -> Moves:
    moves: Moves = []
    real_bind = socket.socket.bind

    def bind(sock: socket.socket, address: object) -> None:
        if not before:
            real_bind(sock, address)  # type: ignore[arg-type]
        if sock.family == socket.AF_UNIX:
            while moves:
                moves.pop(0)()
        if before:
            real_bind(sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "bind", bind)
    return moves


def after_probe(monkeypatch: pytest.MonkeyPatch) -> Moves:
    """Moves to make right after udskit's next probe of a socket file returns."""
    moves: Moves = []
    real_probe = sockfile_module.probe

    def probe(target: str | bytes) -> sockfile_module.Probe:
        found = real_probe(target)
        while moves:
            moves.pop(0)()
        return found

    monkeypatch.setattr(sockfile_module, "probe", probe)
    return moves
