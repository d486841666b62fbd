"""Socket files that ``udskit tap`` has put a relay in front of, or that a killed tap left
displaced: the server's socket at ``DIR/.NAME.udskit-tapped`` (see udskit.sockfile)."""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Callable

from ..sockfile import probe, tapped_name
from .findings import Finding

__all__ = ["tapped_finding", "tapped_note"]


#: Whether a socket listens on the file at a path, as the kernel's socket table says
#: (see ``udskit.inspect.sockets``): asked without connecting to it.
ListeningAt = Callable[[bytes], bool]


def _state(path: bytes, listening_at: ListeningAt | None = None) -> tuple[str, bool] | None:
    """(the tapped name, whether a tap still runs) if the server's socket is aside.

    With ``listening_at``, whether the tap runs is read from the kernel's socket table;
    without, found by connecting to it, which a tap shows as a client (a listing of the
    host must not connect to every server it lists)."""
    directory, name = os.path.split(path)
    aside = os.path.join(directory, tapped_name(name))
    try:
        info = os.lstat(aside)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    try:
        if os.lstat(path).st_uid != info.st_uid:
            return None  # a tap's relay has its server's owner: another user's socket, planted
    except OSError:
        pass  # the path was removed while tapped: the tap's restore puts the socket back
    if listening_at is not None:
        return os.fsdecode(aside), listening_at(path)
    try:
        relay_alive = probe(path).live
    except OSError:
        relay_alive = False
    return os.fsdecode(aside), relay_alive


def tapped_note(path: str, listening_at: ListeningAt | None = None) -> str:
    """For ``udskit ls``: what a tap has done to ``path``, or ''."""
    state = _state(os.fsencode(path), listening_at)
    if state is None:
        return ""
    aside, running = state
    if running:
        return f"tapped: its server's socket is at {aside}"
    return f"displaced by a killed tap: udskit tap --restore {shlex.quote(path)}"


def tapped_finding(path: bytes) -> Finding | None:
    """For ``udskit doctor``: a finding about a tap at ``path``, or None."""
    state = _state(path)
    if state is None:
        return None
    aside, running = state
    shown = os.fsdecode(path)
    if running:
        return Finding(
            "tap",
            "info",
            f"{shown} is being tapped: udskit tap relays its connections; the server's socket "
            f"is at {aside} until the tap stops",
        )
    server = probe(aside).live
    return Finding(
        "tap",
        "problem",
        f"a tap that was killed left the server's socket aside at {aside}"
        + (" (its server is still running)" if server else ""),
        (f"{shown} itself is the killed tap's socket, which nobody listens on",),
        (f"udskit tap --restore {shlex.quote(shown)}",),
    )
