"""systemd's socket activation: which descriptors ``LISTEN_PID``, ``LISTEN_FDS`` and
``LISTEN_FDNAMES`` hand to this process, and under which names (sd_listen_fds(3),
sd_listen_fds_with_names(3)).

The one place that reads those variables: ``fd:listen`` and ``fd:listen:NAME``
(:mod:`udskit.address`), the wording of an adopted descriptor's errors (:mod:`udskit.listening`)
and ``udskit serve``'s descriptor store all ask here.

The variables are read, never removed from the environment (sd_listen_fds(unset_environment=0)):
a process may take several named descriptors at different moments, and an address may be parsed
more than once. ``LISTEN_PID`` is what keeps a child from taking them: its pid differs, so
they are not for it. udskit's own children (``udskit serve --exec`` commands) get an
environment without them, and every descriptor udskit takes becomes close-on-exec.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .errors import AddressError

__all__ = [
    "FDNAME_MAX",
    "SD_LISTEN_FDS_START",
    "Activated",
    "check_fdname",
    "find",
    "inherited",
    "listen_fds",
    "origin",
]

#: sd_listen_fds(3): socket-activated descriptors start at 3, after stdin, stdout and stderr.
SD_LISTEN_FDS_START: Final = 3

#: systemd's FDNAME_MAX: the longest name FileDescriptorName= and FDNAME= accept.
FDNAME_MAX: Final = 255

#: sd_listen_fds_with_names(3): the name of every descriptor when LISTEN_FDNAMES is unset.
UNKNOWN_NAME: Final = "unknown"

_VARIABLES: Final = "LISTEN_PID/LISTEN_FDS"

#: Most digits a LISTEN_PID or LISTEN_FDS value has: a pid is at most 7 (PID_MAX_LIMIT is
#: 2**22) and a count of descriptors stays below RLIMIT_NOFILE's ceiling (2**30). Checked
#: before int(), which refuses over 4300 digits with a ValueError of its own.
_MAX_DIGITS: Final = 10

#: Characters of a malformed value shown in an error: enough to recognise it.
_SHOWN: Final = 40


@dataclass(frozen=True, slots=True)
class Activated:
    """One descriptor systemd passed: its number and its name in ``LISTEN_FDNAMES``."""

    fd: int
    name: str


def check_fdname(name: str, what: str = "FDNAME") -> str:
    """``name`` if systemd accepts it as a descriptor name (fdname_is_valid() in systemd):
    at most 255 printable ASCII characters, no ``:`` (the separator of LISTEN_FDNAMES);
    otherwise a ValueError (an :class:`AddressError`) naming the rule."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    bad = next((c for c in name if not " " <= c <= "~" or c == ":"), None)
    if bad is not None:
        raise AddressError(
            f"{what} {name!r} holds {bad!r}: systemd's descriptor names are printable ASCII "
            "without ':' (the separator of LISTEN_FDNAMES)"
        )
    if len(name) > FDNAME_MAX:
        raise AddressError(
            f"{what} {name[:40]!r}... is {len(name)} characters; systemd's limit is {FDNAME_MAX}"
        )
    return name


def listen_fds(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> tuple[Activated, ...]:
    """The descriptors systemd passed to process ``pid`` (default: this one), with names.

    Raises :class:`AddressError` saying which variable is wrong: unset, malformed, meant
    for another process (``LISTEN_PID``), or ``LISTEN_FDNAMES`` not naming each descriptor.
    """
    env = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    if pid_text is None and count_text is None:
        raise AddressError(
            f"no socket-activated descriptor: {_VARIABLES} are not set for this process; "
            "start it from a systemd socket unit (or systemd-socket-activate), or use fd:N"
        )
    if pid_text is None or not _decimal(pid_text) or int(pid_text) < 1:
        raise AddressError(
            f"LISTEN_PID={_shown(pid_text)} is not a process id: socket activation sets it to the "
            "pid of the process the descriptors are for"
        )
    if int(pid_text) != me:
        raise AddressError(
            f"LISTEN_PID={pid_text}: the socket-activated descriptors were meant for process "
            f"{pid_text}, not this one ({me}); it inherited the variables from a parent that "
            "did not unset them: use fd:N, or let the service manager start this process"
        )
    count = _count(count_text)
    names = _names(env.get("LISTEN_FDNAMES"), count)
    return tuple(Activated(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names))


def inherited(environ: Mapping[str, str] | None = None) -> tuple[Activated, ...]:
    """Like sd_listen_fds_with_names(3) called without complaint: the descriptors passed to
    this process, or none when the variables are unset, malformed or for another process."""
    try:
        return listen_fds(environ)
    except AddressError:
        return ()


def find(name: str | None, environ: Mapping[str, str] | None = None) -> int:
    """The descriptor ``fd:listen:NAME`` means (``name`` None: ``fd:listen``, the first).

    With several descriptors of one name (a .socket unit with two ``ListenStream=`` lines
    names both after the unit), the first is taken; ``fd:N`` reaches the others.
    """
    if name is not None:
        check_fdname(name, "the name")
        if not name:
            raise AddressError(
                "write a name after the colon (fd:listen:NAME), or none at all (fd:listen) "
                "for the first descriptor"
            )
    passed = listen_fds(environ)
    if not passed:
        raise AddressError(
            "LISTEN_FDS=0: the service manager passed no descriptor to this process; "
            "check the unit's Sockets= or its .socket unit"
        )
    if name is None:
        return passed[0].fd
    for entry in passed:
        if entry.name == name:
            return entry.fd
    there = ", ".join(sorted({entry.name for entry in passed}))
    hint = (
        "LISTEN_FDNAMES is unset, so every descriptor is named 'unknown'"
        if "LISTEN_FDNAMES" not in (os.environ if environ is None else environ)
        else f"LISTEN_FDNAMES has {there}"
    )
    raise AddressError(
        f"no socket-activated descriptor is named {name!r} ({hint}); "
        "set FileDescriptorName= in the .socket unit, or use one of those names"
    )


def origin(fd: int, environ: Mapping[str, str] | None = None) -> Activated | None:
    """The socket-activation entry of ``fd`` when systemd passed it to this process."""
    for entry in inherited(environ):
        if entry.fd == fd:
            return entry
    return None


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS


def _shown(text: str | None) -> str:
    """A variable's value for a one-line error: as it is if printable, else quoted; cut."""
    text = text or ""
    cut = text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
    return cut if cut.isprintable() else repr(cut)


def _count(text: str | None) -> int:
    if text is None or not _decimal(text):
        raise AddressError(
            f"LISTEN_FDS={_shown(text)} is not a number of descriptors: socket activation sets "
            "it to how many descriptors it passed, from 3 on"
        )
    count = int(text)
    # The descriptors are 3 .. 3+count-1: none can be at or beyond this process's limit.
    limit = os.sysconf("SC_OPEN_MAX")
    if SD_LISTEN_FDS_START + count > limit:
        raise AddressError(
            f"LISTEN_FDS={text} names descriptors up to {SD_LISTEN_FDS_START + count - 1}, "
            f"beyond this process's limit of {limit} open files: the variable is not "
            "systemd's"
        )
    return count


def _names(text: str | None, count: int) -> list[str]:
    if text is None:
        return [UNKNOWN_NAME] * count
    names = text.split(":") if count or text else []
    if len(names) != count:
        raise AddressError(
            f"LISTEN_FDNAMES={_shown(text)} holds {len(names)} name(s) for LISTEN_FDS={count} "
            "descriptors: it must name each descriptor, separated by ':'"
        )
    for name in names:
        check_fdname(name, "LISTEN_FDNAMES entry")
    return names
