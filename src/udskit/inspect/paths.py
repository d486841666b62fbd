"""The walk along a socket's path: does each part exist, and may the user pass?"""

from __future__ import annotations

import difflib
import errno
import os
import shlex
import stat
from dataclasses import dataclass
from typing import Final

from ..address import MAX_DIRECT_PATH, SUN_PATH_MAX, one_line, unexpanded_home
from .findings import FileInfo, Finding, UserInfo
from .names import group_name, user_name

__all__ = ["NAME_MAX", "SUGGESTIONS", "Walk", "length_finding", "walk"]

#: Longest file name (one path component) Linux accepts (NAME_MAX).
NAME_MAX: Final = 255

#: Bits of a mode: search on a directory, write on a socket.
SEARCH: Final = 0o1
WRITE: Final = 0o2

#: How many similar names a diagnosis suggests for a name that does not exist.
SUGGESTIONS: Final = 3


@dataclass(frozen=True, slots=True)
class Walk:
    findings: tuple[Finding, ...]
    stop: bool  # nothing to connect to (missing, not a socket) or nothing more we can see
    socket: FileInfo | None = None


def walk(path: bytes, user: UserInfo) -> Walk:
    """Each directory from / down, then the socket: does it exist, may ``user`` pass?"""
    findings: list[Finding] = []
    parts = [p for p in path.split(b"/") if p]
    current = b"/"
    for index, part in enumerate(parts):
        parent, current = current, os.path.join(current, part)
        last = index == len(parts) - 1
        try:
            info = os.stat(current)
        except FileNotFoundError:
            findings.append(_missing(path, parent, current, last))
            return Walk(tuple(findings), stop=True)
        except NotADirectoryError:
            info = os.stat(parent)
            findings.append(_not_directory(path, FileInfo.of(parent, info)))
            return Walk(tuple(findings), stop=True)
        except PermissionError:
            findings.append(_cannot_look(parent))
            return Walk(tuple(findings), stop=True)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                findings.append(length_finding(current) or _cannot_stat(current, exc))
            else:
                findings.append(_cannot_stat(current, exc))
            return Walk(tuple(findings), stop=True)
        here = FileInfo.of(current, info)
        if not last:
            if not stat.S_ISDIR(info.st_mode):
                findings.append(_not_directory(path, here))
                return Walk(tuple(findings), stop=True)
            if not _allowed(user, here, SEARCH):
                findings.append(_denied(user, here, SEARCH))
            continue
        if not stat.S_ISSOCK(info.st_mode):
            findings.append(_not_socket(here))
            return Walk(tuple(findings), stop=True)
        link = _symlink(current, user)
        if link is not None:
            findings.append(link)
        if not _allowed(user, here, WRITE):
            findings.append(_denied(user, here, WRITE))
        if not any(f.status == "problem" for f in findings):
            findings.append(
                Finding(
                    "permission",
                    "ok",
                    f"{user.name} may search every directory on the way and write to the "
                    f"socket ({here})",
                )
            )
        return Walk(tuple(findings), stop=False, socket=here)
    findings.append(
        Finding("path", "problem", f"{os.fsdecode(path)} names a directory, not a socket file")
    )
    return Walk(tuple(findings), stop=True)


def _allowed(user: UserInfo, info: FileInfo, bit: int) -> bool:
    if user.uid == 0:
        return True  # CAP_DAC_OVERRIDE
    if info.uid == user.uid:
        shift = 6
    elif info.gid in user.groups:
        shift = 3
    else:
        shift = 0
    return bool((info.mode >> shift) & bit)


def _denied(user: UserInfo, info: FileInfo, bit: int) -> Finding:
    is_dir = bit == SEARCH
    need = "search (x) permission on directory" if is_dir else "write (w) permission on socket"
    if info.uid == user.uid:
        applies = "it owns the file, so the owner bits apply"
    elif info.gid in user.groups:
        applies = f"it is in group {group_name(info.gid)}, so the group bits apply"
    else:
        applies = "it is neither the owner nor in the group, so the 'other' bits apply"
    facts = [
        f"{info.path}: {info}",
        f"{user}: {applies}",
    ]
    if info.has_acl:
        facts.append("the file also carries an ACL, which may grant more (getfacl shows it)")
    return Finding(
        "permission",
        "problem",
        f"{user.name} lacks {need} {info.path}",
        tuple(facts),
        _permission_fixes(user, info, bit),
    )


def _permission_fixes(user: UserInfo, info: FileInfo, bit: int) -> tuple[str, ...]:
    path = shlex.quote(info.path)
    is_dir = bit == SEARCH
    fixes: list[str] = []
    if info.uid == user.uid:
        fixes.append(f"chmod {info.mode | bit << 6:o} {path}")
    else:
        group = group_name(info.gid)
        # Group access: the socket's usual fix is read+write for the group (660); a
        # directory only needs search (x) for the group.
        grant = (0o010 if is_dir else 0o060) | info.mode
        if info.gid in user.groups:
            fixes.append(f"chmod {grant:o} {path}")
        else:
            if info.mode & bit << 3 and info.gid != 0:  # never advise joining group root
                fixes.append(
                    f"usermod -aG {group} {user.name}   (then restart {user.name}'s processes: "
                    "groups are read when a process starts)"
                )
            own_group = group_name(user.gid)
            fixes.append(f"chgrp {own_group} {path} && chmod {grant:o} {path}")
        if is_dir:
            fixes.append(f"chmod o+x {path}   (anyone may pass through; listing stays private)")
    if not is_dir:
        fixes.append(
            "the server re-creates the socket at each start: make it last with the server's own "
            f"options, e.g. udskit serve --mode 660 --group {group_name(user.gid)} ..."
        )
    return tuple(fixes)


def _missing(path: bytes, parent: bytes, current: bytes, last: bool) -> Finding:
    shown = os.fsdecode(path)
    try:
        siblings = os.listdir(parent)
    except OSError:
        siblings = []
    wanted = os.path.basename(current)
    if last:
        sockets = [s for s in siblings if _is_socket(os.path.join(parent, s))]
        similar = difflib.get_close_matches(wanted, sockets, n=SUGGESTIONS, cutoff=0.6)
        facts = [f"the directory {os.fsdecode(parent)} exists"]
        if sockets:
            names = ", ".join(os.fsdecode(s) for s in sorted(sockets)[:10])
            facts.append(f"sockets in it: {names}")
        link = _dangling(current)
        if link is not None:
            facts.append(f"{shown} is a symlink to {link}, which does not exist")
        fixes = [f"did you mean {os.fsdecode(os.path.join(parent, s))}?" for s in similar]
        fixes.append(f"start the server (it creates {shown}), or check the path")
        return Finding("path", "problem", f"no such file: {shown}", tuple(facts), tuple(fixes))
    dirs = [s for s in siblings if os.path.isdir(os.path.join(parent, s))]
    similar = difflib.get_close_matches(wanted, dirs, n=SUGGESTIONS, cutoff=0.6)
    missing = os.fsdecode(current)
    fixes = [f"did you mean {os.fsdecode(os.path.join(parent, s))}?" for s in similar]
    home = unexpanded_home(current)
    if home is not None:  # creating a directory named ~ is not the fix
        fixes = [home]
    else:
        fixes.append(
            f"create it before the server starts: mkdir -p {shlex.quote(os.path.dirname(shown))}"
        )
    return Finding(
        "path",
        "problem",
        f"no such file: the directory {missing} does not exist ({os.fsdecode(parent)} does)",
        (),
        tuple(fixes),
    )


def _not_directory(path: bytes, info: FileInfo) -> Finding:
    return Finding(
        "path",
        "problem",
        f"{info.path} is a {info.kind}, not a directory, so {os.fsdecode(path)} cannot exist",
        fixes=("check the path",),
    )


def _not_socket(info: FileInfo) -> Finding:
    quoted = shlex.quote(info.path)
    return Finding(
        "path",
        "problem",
        f"{info.path} is a {info.kind}, not a socket",
        (f"{info.path}: {info}",),
        (
            "check the path: the server's socket is elsewhere, or the server has not started",
            f"if it is a leftover, move it (udskit never deletes it): mv {quoted} {quoted}.old",
        ),
    )


def _cannot_look(directory: bytes) -> Finding:
    me = UserInfo.current()
    return Finding(
        "permission",
        "problem",
        f"cannot look inside {os.fsdecode(directory)}: {me.name} (running this check) lacks "
        "search permission there",
        fixes=("run the check as root (sudo udskit doctor ...) to see past it",),
    )


def _cannot_stat(path: bytes, exc: OSError) -> Finding:
    return Finding(
        "path",
        "problem",
        f"cannot examine {os.fsdecode(path)}: {os.strerror(exc.errno or 0).lower()}",
    )


def _is_socket(path: bytes | str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _symlink(path: bytes, user: UserInfo) -> Finding | None:
    """A finding if the socket's own name is a symlink, naming who made it: in a shared
    directory (/tmp) anyone may plant one, leading clients to a socket of their own."""
    try:
        info = os.lstat(path)
        if not stat.S_ISLNK(info.st_mode):
            return None
        leads_to = one_line(os.fsdecode(os.readlink(path)))  # whoever made it chose it
    except OSError:
        return None
    shown = os.fsdecode(path)
    summary = (
        f"{shown} is a symlink to {leads_to}, made by {user_name(info.st_uid)} "
        f"(uid {info.st_uid}): a connect reaches whatever it points to"
    )
    if info.st_uid in (0, user.uid):
        return Finding("path", "info", summary)
    return Finding(
        "path",
        "warning",
        summary,
        fixes=(
            f"if that is not the server you expect, remove the symlink: rm {shlex.quote(shown)}",
        ),
    )


def _dangling(path: bytes) -> str | None:
    try:
        return one_line(os.fsdecode(os.readlink(path)))  # whoever made it chose it
    except OSError:
        return None


def length_finding(path: bytes) -> Finding | None:
    """S11: sun_path holds 108 bytes; longer paths only work through a directory fd."""
    longest = max((len(part) for part in path.split(b"/")), default=0)
    if longest > NAME_MAX:
        return Finding(
            "length",
            "problem",
            f"a component of {os.fsdecode(path)} is {longest} bytes; file names are limited "
            f"to {NAME_MAX} bytes (NAME_MAX)",
            fixes=("use shorter names",),
        )
    if len(path) <= MAX_DIRECT_PATH:
        return None
    name = os.path.basename(path)
    # The longest form udskit may need: /proc/self/fd/N/NAME with a 4-digit descriptor.
    via = len(b"/proc/self/fd/1000/") + len(name)
    shown = os.fsdecode(path)
    if via > MAX_DIRECT_PATH:
        return Finding(
            "length",
            "problem",
            f"{shown} is {len(path)} bytes and its file name alone {len(name)}: sun_path "
            f"holds {SUN_PATH_MAX} bytes, and even through its directory "
            f"(/proc/self/fd/N/NAME) the name does not fit",
            fixes=(
                (
                    f"use a path of at most {MAX_DIRECT_PATH} bytes, or a file name of at "
                    f"most {MAX_DIRECT_PATH - via + len(name)} bytes"
                ),
            ),
        )
    return Finding(
        "length",
        "warning",
        f"{shown} is {len(path)} bytes, more than the {MAX_DIRECT_PATH} that fit in sun_path: "
        "udskit reaches it through its directory (/proc/self/fd/N/NAME), but most programs "
        "(nginx, curl, socat, nc) cannot",
        fixes=(f"use a path of at most {MAX_DIRECT_PATH} bytes if other programs must connect",),
    )
