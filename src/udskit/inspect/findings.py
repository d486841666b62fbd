"""The values a diagnosis is made of: findings, users, files, servers."""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from ..translate import kind_of
from .names import group_name, user_name
from .probe import SocketTypeName

__all__ = ["Diagnosis", "FileInfo", "Finding", "ServerInfo", "Status", "UserInfo", "has_acl"]

Status: TypeAlias = Literal["ok", "problem", "warning", "info"]

_TYPE_BITS: Final = {
    "directory": stat.S_IFDIR,
    "socket": stat.S_IFSOCK,
    "regular file": stat.S_IFREG,
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One conclusion of a diagnosis.

    ``check`` names what was examined (``address``, ``path``, ``permission``, ``length``,
    ``listening``, ``type``, ``server``, ...); ``summary`` is the conclusion in one line;
    ``facts`` back it up; ``fixes`` are exact commands or steps, one per line, any one of
    which resolves a ``problem``.
    """

    check: str
    status: Status
    summary: str
    facts: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserInfo:
    """A user as the kernel judges it: uid, primary gid, and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # all of them, the primary group included

    @classmethod
    def current(cls) -> UserInfo:
        """This process: effective uid and gid, and its supplementary groups."""
        uid, gid = os.geteuid(), os.getegid()
        return cls(user_name(uid), uid, gid, tuple(sorted({gid, *os.getgroups()})))

    @classmethod
    def lookup(cls, user: str | int) -> UserInfo:
        """A user from the passwd and group databases (name or uid), as it would be at its
        next login: its primary group and every group that lists it as a member."""
        try:
            entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
        except (KeyError, OverflowError):
            raise ValueError(
                f"unknown user {user!r}: not in the passwd database (getent passwd {user})"
            ) from None
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(sorted(set(groups))))

    def __str__(self) -> str:
        groups = ", ".join(f"{group_name(g)}({g})" for g in self.groups)
        return f"{self.name} (uid {self.uid}, groups {groups or 'none'})"


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file on the way to a socket: what it is, its permission bits and its owner."""

    path: str
    kind: str  # "directory", "socket", "regular file", "symlink", ...
    mode: int  # the permission bits only (st_mode & 0o7777)
    uid: int
    gid: int
    mtime: float
    has_acl: bool = False

    @classmethod
    def of(cls, path: str | bytes, info: os.stat_result) -> FileInfo:
        return cls(
            os.fsdecode(path),
            kind_of(info.st_mode),
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            info.st_gid,
            info.st_mtime,
            has_acl(path),
        )

    def __str__(self) -> str:
        acl = "+" if self.has_acl else ""
        letters = stat.filemode(self.mode | _TYPE_BITS.get(self.kind, 0))
        return f"{letters}{acl} {user_name(self.uid)}:{group_name(self.gid)} (mode {self.mode:04o})"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Who answers at an address: the socket type, and the serving process where known."""

    type: SocketTypeName
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    process: str | None = None

    def __str__(self) -> str:
        parts = [f"a {self.type} server"]
        if self.pid is not None:
            parts.append(f"pid {self.pid} ({self.process or '?'})")
        if self.uid is not None:
            parts.append(f"uid {self.uid} ({user_name(self.uid)})")
        if self.gid is not None:
            parts.append(f"gid {self.gid} ({group_name(self.gid)})")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Everything :func:`diagnose` found about connecting to ``address`` as ``user``.

    ``findings`` is in the order the checks ran; more can be added with :meth:`adding`
    (another check, e.g. whether the server speaks HTTP, is one more Finding).
    """

    address: str
    user: UserInfo
    findings: tuple[Finding, ...]
    server: ServerInfo | None = None
    as_other: bool = False  # judged for another user than the one running the check

    @property
    def ok(self) -> bool:
        """True when nothing stops ``user`` from connecting."""
        return not any(f.status == "problem" for f in self.findings)

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.status == "problem")

    def adding(self, *findings: Finding) -> Diagnosis:
        """This diagnosis with more findings at the end."""
        return dataclasses.replace(self, findings=self.findings + findings)


def has_acl(path: str | bytes) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        return False
