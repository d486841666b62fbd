"""Peer credentials (SO_PEERCRED, SO_PEERGROUPS, SCM_CREDENTIALS) and the access policy.

The kernel vouches for these values: for stream and seqpacket sockets they are the
credentials of the process that called connect() (or socketpair()/listen()); for datagrams,
SCM_CREDENTIALS carries the sender's, checked by the kernel at send time. They are never
parsed from strings.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .errors import PeerRejected

__all__ = ["PeerCred", "Policy", "peer_cred", "peer_groups"]

log = logging.getLogger("udskit")

#: struct ucred { pid_t pid; uid_t uid; gid_t gid; } — three native ints on Linux.
UCRED: Final = struct.Struct("3i")

#: SO_PEERGROUPS (Linux 4.13+) is not exported by the socket module.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)

#: Buffer sizes (in groups) tried for SO_PEERGROUPS; the kernel answers ERANGE when the
#: peer has more. Linux allows 65536 groups (NGROUPS_MAX), but CPython's getsockopt() reads
#: at most 1024 bytes, 256 groups: a peer in more is reported with no supplementary groups
#: (so a gid rule can only match its primary group: refused rather than guessed).
_PEERGROUPS_TRIES: Final = (64, 256)


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Who is on the other end: process id, user id and group id, as the kernel says.

    ``pid`` is the peer's pid in our pid namespace (0 if it is in none we can see).
    ``groups`` holds the peer's supplementary groups where the kernel reports them
    (stream and seqpacket, via SO_PEERGROUPS); it is empty for datagrams.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"

    @property
    def process_name(self) -> str:
        """The peer's command name from /proc (best effort: '?' once it has exited)."""
        try:
            with open(f"/proc/{self.pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "?"
        except OSError:
            return "?"


def peer_cred(sock: socket.socket) -> PeerCred:
    """The credentials of a connected stream or seqpacket socket's peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(raw)
    return PeerCred(pid, uid, gid, peer_groups(sock))


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (SO_PEERGROUPS); empty where unsupported."""
    for size in _PEERGROUPS_TRIES:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # the peer has more groups than the buffer holds
                continue
            return ()  # ENOPROTOOPT on old kernels, or not a connected socket
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


def unpack_ucred(data: bytes) -> PeerCred | None:
    """A PeerCred from the payload of an SCM_CREDENTIALS control message, or None when it
    carries no credentials.

    A datagram sent while neither end had SO_PASSCRED set (one queued on a socket-activated
    datagram socket before the server started, say) has no credentials attached; the kernel
    still answers SCM_CREDENTIALS at receive time, with pid 0 and the overflow uid and gid
    (65534: nobody), which are nobody's. A sender in a pid namespace we cannot see also
    shows pid 0; its uid is real, but it cannot be told from the first kind, so it is
    treated the same: no credentials. Judging either as ``nobody`` would refuse root, or
    serve an unknown sender as whoever a policy lets in as 65534.
    """
    pid, uid, gid = UCRED.unpack(data[: UCRED.size])
    if pid == 0:
        return None
    return PeerCred(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class Policy:
    """Which peers may talk to us. A peer is allowed if *any* rule matches it.

    ``Policy(uids={1000})``, ``Policy(gids={33})``, ``Policy.same_user()``, or combinations.
    Groups match the peer's primary gid and, for stream and seqpacket peers, its
    supplementary groups. An empty policy allows nobody; pass ``allow=None`` for everyone.
    """

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    same_user: bool = False

    def __init__(
        self, uids: Iterable[int] = (), gids: Iterable[int] = (), same_user: bool = False
    ) -> None:
        object.__setattr__(self, "uids", frozenset(_ids(uids, "uid")))
        object.__setattr__(self, "gids", frozenset(_ids(gids, "gid")))
        object.__setattr__(self, "same_user", bool(same_user))

    @classmethod
    def same_user_only(cls) -> Policy:
        """Only processes running as our own effective uid."""
        return cls(same_user=True)

    def allows(self, peer: PeerCred) -> bool:
        if peer.uid in self.uids:
            return True
        if self.same_user and peer.uid == os.geteuid():
            return True
        return peer.gid in self.gids or not self.gids.isdisjoint(peer.groups)

    def __str__(self) -> str:
        rules = [f"uid {u}" for u in sorted(self.uids)] + [f"gid {g}" for g in sorted(self.gids)]
        if self.same_user:
            rules.append(f"same user (uid {os.geteuid()})")
        return " or ".join(rules) or "nobody"

    def check(self, peer: PeerCred, where: object) -> bool:
        """Log and return False if ``peer`` is refused; True if allowed."""
        if self.allows(peer):
            return True
        log.warning("%s: refused peer %s (allowed: %s)", where, peer, self)
        return False


def _ids(values: Iterable[int], what: str) -> Iterable[int]:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"policy {what}s must be non-negative integers, not {value!r}")
        yield value


def require_uid(peer: PeerCred, expected: int, where: object) -> None:
    """Raise PeerRejected unless the server on the other end runs as ``expected``."""
    if peer.uid != expected:
        raise PeerRejected(
            f"{where} is served by uid {peer.uid} (pid {peer.pid}), not the expected uid "
            f"{expected}: another program may have taken the path"
        )
