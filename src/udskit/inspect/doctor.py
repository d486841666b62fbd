"""``diagnose``: why a user can or cannot connect to an address, one finding per cause."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import shlex
import socket
import time
import warnings

from ..address import Address, AddressLike, sun_path
from ..errors import AddressError
from .findings import Diagnosis, FileInfo, Finding, ServerInfo, UserInfo
from .names import age, user_name
from .paths import SUGGESTIONS, length_finding, walk
from .probe import TYPES, Attempt, SocketTypeName, try_connect, type_name
from .sockets import SocketEntry, list_sockets, proc_ids
from .tapped import tapped_finding

__all__ = ["diagnose"]


def diagnose(
    address: AddressLike,
    *,
    user: str | int | UserInfo | None = None,
    type: str = "stream",  # noqa: A002
) -> Diagnosis:
    """Why ``user`` (default: this process) can or cannot connect to ``address`` with a
    socket of ``type``: one Finding per cause, each problem with its exact fix.

    For another user the path and permissions are judged from the passwd and group
    databases; whether a server answers is tested by connecting from this process.
    """
    me = UserInfo.current()
    who = me if user is None else user if isinstance(user, UserInfo) else UserInfo.lookup(user)
    kind = type_name(type)
    shown = address if isinstance(address, str) else os.fsdecode(bytes(address))  # type: ignore[arg-type]
    base = Diagnosis(shown, who, (), as_other=who.uid != me.uid)
    try:
        target = Address.parse(address)
    except AddressError as exc:
        return base.adding(_address_problem(exc))
    base = dataclasses.replace(base, address=str(target))
    if target.kind == "fd":
        return base.adding(
            Finding(
                "address",
                "problem",
                f"{target} is a descriptor of this process, not an address other programs reach",
                fixes=("give the socket's path, @name or tcp:HOST:PORT",),
            )
        )
    if target.kind == "tcp":
        return _diagnose_tcp(base, target)
    if target.kind == "abstract":
        return _diagnose_abstract(base, target, kind)
    return _diagnose_path(base, target, kind, me)


def _address_problem(exc: AddressError) -> Finding:
    text = str(exc)
    too_long = "bytes" in text and ("limit" in text or "sun_path" in text)
    return Finding(
        "length" if too_long else "address",
        "problem",
        text,
        fixes=("use a shorter path" if too_long else "correct the address",),
    )


def _diagnose_tcp(base: Diagnosis, target: Address) -> Diagnosis:
    attempt = try_connect(target)
    if attempt.ok:
        return dataclasses.replace(base, server=ServerInfo("stream")).adding(
            Finding("listening", "ok", f"{target} accepts TCP connections")
        )
    return base.adding(Finding("listening", "problem", attempt.reason))


def _diagnose_abstract(base: Diagnosis, target: Address, kind: SocketTypeName) -> Diagnosis:
    note = Finding(
        "permission",
        "info",
        "abstract names have no file permissions: any process in this network namespace "
        "may connect, and only the server's own check of its peers (udskit serve "
        "--allow-uid) restricts who is served",
    )
    attempt = try_connect(target, kind)
    if attempt.ok:
        return _connected(base, target, attempt).adding(note)
    if attempt.errno == errno.ECONNREFUSED:
        other = try_connect(target)  # an abstract name of another type refuses as well
        if other.ok and other.type != kind:
            return base.adding(_wrong_type(target, kind, other.type))
        names = sorted({e.path for e in list_sockets(with_owners=False) if e.path.startswith("@")})
        similar = difflib.get_close_matches(str(target), names, n=SUGGESTIONS, cutoff=0.6)
        facts = [f"similar names in use: {', '.join(similar)}"] if similar else []
        facts.append(
            "abstract names belong to a network namespace: a server in another container "
            "(or started with 'unshare -n') is invisible from here"
        )
        return base.adding(
            Finding(
                "listening",
                "problem",
                f"no socket is bound to {target} in this network namespace",
                tuple(facts),
                ("start the server, or check the name ('udskit ls' lists the names in use)",),
            )
        )
    return base.adding(_refusal(target, attempt, kind))


def _diagnose_path(
    base: Diagnosis, target: Address, kind: SocketTypeName, me: UserInfo
) -> Diagnosis:
    path = target.absolute().raw
    findings: list[Finding] = []
    length = length_finding(path)
    if length is not None:
        findings.append(length)
        if length.status == "problem":
            return base.adding(*findings)
    route = walk(path, base.user)
    findings.extend(route.findings)
    if route.stop:
        return base.adding(*findings)
    denied = any(f.check == "permission" and f.status == "problem" for f in route.findings)
    if denied and base.user.uid == me.uid:
        return base.adding(*findings)  # our connect would only be refused for the same reason
    tapped = tapped_finding(path)
    if tapped is not None:
        findings.append(tapped)
    attempt = try_connect(target, kind)
    if attempt.ok:
        if base.as_other and me.uid == 0:
            findings = _kernel_verdict(findings, target, kind, base.user, denied)
            denied = any(f.check == "permission" and f.status == "problem" for f in findings)
        result = _connected(base, target, attempt, checked_by=me, denied=denied)
        return dataclasses.replace(result, findings=(*findings, *result.findings))
    if attempt.errno in (errno.EACCES, errno.EPERM) and not denied:
        findings.append(_unexplained_denial(target, route.socket, me))
    elif attempt.errno == errno.ECONNREFUSED and route.socket is not None:
        if tapped is None:
            findings.append(_stale(target, route.socket))
    else:
        findings.append(_refusal(target, attempt, kind))
    return base.adding(*findings)


def _kernel_verdict(
    findings: list[Finding],
    target: Address,
    kind: SocketTypeName,
    user: UserInfo,
    denied: bool,
) -> list[Finding]:
    """Root can ask the kernel itself: connect as ``user`` and see. ACLs and security
    modules can decide differently from the mode bits; the kernel's answer wins."""
    code = _connect_as(user, target, kind)
    if code == 0 and denied:
        demoted = [
            dataclasses.replace(f, status="warning", fixes=())
            if f.check == "permission" and f.status == "problem"
            else f
            for f in findings
        ]
        demoted.append(
            Finding(
                "permission",
                "ok",
                f"yet the kernel let {user.name} connect: an ACL grants what the mode bits "
                "do not (getfacl shows it)",
            )
        )
        return demoted
    if code in (errno.EACCES, errno.EPERM) and not denied:
        return [*findings, _unexplained_denial(target, None, user)]
    if code in (errno.EACCES, errno.EPERM, 0):
        outcome = "refused (permission denied)" if code else "accepted"
        return [
            *findings,
            Finding("permission", "info", f"confirmed: a connect as {user.name} was {outcome}"),
        ]
    reason = os.strerror(code).lower() if code > 0 else "the check could not run"
    return [*findings, Finding("permission", "info", f"a connect as {user.name} failed: {reason}")]


def _connect_as(user: UserInfo, target: Address, kind: SocketTypeName) -> int:
    """connect()'s errno for ``user``: a forked child takes on the user's groups, gid and
    uid (which needs root), connects without waiting and reports back. -1 if it could not."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a threaded process may deadlock the child if it
        # needs a lock another thread held. This child takes none: a few system calls, then
        # os._exit(), with no imports, logging or I/O buffers in between.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        try:
            os.close(read_end)
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
            flags = TYPES[kind] | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            with sun_path(target) as where, socket.socket(socket.AF_UNIX, flags) as sock:
                os.write(write_end, b"%d" % sock.connect_ex(where))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
    finally:
        os.waitpid(pid, 0)
    return int(answer) if answer.isdigit() else -1


def _connected(
    base: Diagnosis,
    target: Address,
    attempt: Attempt,
    *,
    checked_by: UserInfo | None = None,
    denied: bool = False,
) -> Diagnosis:
    assert attempt.type is not None
    peer = attempt.peer
    holders = _holders(target, attempt.type)
    if peer is not None and (not holders or peer.pid in holders[0].pids):
        server = ServerInfo(attempt.type, peer.pid, peer.uid, peer.gid, peer.process_name)
    else:
        # No credentials (datagrams), or a listener handed over: SO_PEERCRED names the
        # process that called listen(), which may have passed the socket on and exited.
        server = _server_from_proc(holders, attempt.type)
    if not base.as_other:
        verdict = f"connected to {target}: {server}"
    elif denied:  # the server is up, but the user we judge for may not reach it
        who = checked_by.name if checked_by is not None else "ourselves"
        verdict = f"the server answers at {target} (connected as {who}): {server}"
    elif checked_by is None or checked_by.uid == 0:  # root asked the kernel as the user
        verdict = f"{base.user.name} can connect to {target}: {server}"
    else:
        verdict = (
            f"{base.user.name} can connect to {target}: {server} (we connected as "
            f"{checked_by.name}; {base.user.name}'s access judged from the permission bits)"
        )
    found = dataclasses.replace(base, server=server).adding(Finding("server", "ok", verdict))
    return found.adding(*_handover_findings(target, holders))


def _holders(target: Address, kind: SocketTypeName) -> list[SocketEntry]:
    """The listening (or bound) socket at ``target`` and its handover socket, with the
    processes that hold them (those this user may see)."""
    wanted = "@" + target.path if target.kind == "abstract" else target.absolute().path
    found = [
        entry
        for entry in list_sockets(with_owners=True)
        # (any state: a bound datagram socket shows as connected once a peer has connected)
        if entry.path == wanted and entry.pids
    ]
    # The socket itself first, of the type that answered; then the handover socket.
    return sorted(
        (e for e in found if e.type == kind or e.state == "handover"),
        key=lambda e: e.state == "handover",
    )


def _server_from_proc(holders: list[SocketEntry], kind: SocketTypeName) -> ServerInfo:
    """The process holding the socket, where SO_PEERCRED cannot tell: the one that offers
    handover if there is one (the newest), else the first."""
    if not holders or holders[0].state == "handover":
        return ServerInfo(kind)
    pids = holders[0].pids
    offering = [p for e in holders[1:] for p in e.pids if p in pids]
    pid = offering[0] if offering else pids[0]
    uid, gid = proc_ids(pid)
    return ServerInfo(kind, pid, uid, gid, holders[0].processes[pids.index(pid)])


def _handover_findings(target: Address, holders: list[SocketEntry]) -> list[Finding]:
    """Whether the server can be restarted in place, and a handover under way."""
    findings = []
    listener = [e for e in holders if e.state != "handover"]
    offering = [p for e in holders if e.state == "handover" for p in e.pids]
    if offering and listener and len(listener[0].pids) > 1:
        # (Only for a udskit server that hands over: prefork servers such as gunicorn share
        # their listener with their workers all the time.)
        pids = ", ".join(str(p) for p in listener[0].pids)
        findings.append(
            Finding(
                "handover",
                "info",
                f"processes {pids} hold the listening socket: a handover is under way, or "
                "the server shares it with its children",
            )
        )
    if offering:
        findings.append(
            Finding(
                "handover",
                "info",
                f"pid {offering[0]} offers handover: 'udskit upgrade {target}' restarts it "
                "without refusing a client",
            )
        )
    return findings


def _refusal(target: Address, attempt: Attempt, kind: SocketTypeName) -> Finding:
    if attempt.errno == errno.EPROTOTYPE:
        actual = try_connect(target)
        found = actual.type if actual.errno != errno.EPROTOTYPE else None
        if found is not None and found != kind:
            return _wrong_type(target, kind, found)
    if attempt.errno == errno.EAGAIN:
        return Finding(
            "listening",
            "problem",
            f"the server at {target} is alive but its backlog is full: it does not accept "
            "connections as fast as they come (nginx reports '11: Resource temporarily "
            "unavailable')",
            (),
            (
                "find out why the server is slow or stuck (udskit ls shows its pid)",
                "raise its backlog (udskit serve --backlog N; net.core.somaxconn caps it)",
            ),
        )
    return Finding("listening", "problem", attempt.reason)


def _wrong_type(target: Address, kind: SocketTypeName, found: SocketTypeName | None) -> Finding:
    why = "EPROTOTYPE" if target.kind == "path" else "the name is bound by another type"
    return Finding(
        "type",
        "problem",
        f"{target} is a {found} socket, not a {kind} one ({why})",
        (f"a {kind} client cannot connect to a {found} server",),
        (f"connect with --type {found} (udskit.connect(..., type={found!r}))",),
    )


def _stale(target: Address, info: FileInfo) -> Finding:
    seconds = max(0.0, time.time() - info.mtime)
    owner = f"uid {info.uid} ({user_name(info.uid)})"
    facts = [f"the socket file was created {age(seconds)} ago by {owner}"]
    holders = [
        e for e in list_sockets(with_owners=True) if e.path == info.path and e.state == "listening"
    ]
    for entry in holders:
        owner = f"pid {entry.pids[0]} ({entry.processes[0]})" if entry.pids else "a process"
        facts.append(
            f"{owner} still listens on a socket once bound at this path, but the file there "
            "now is another one: it was deleted and re-created; restart that server"
        )
    quoted = shlex.quote(info.path)
    return Finding(
        "listening",
        "problem",
        f"nothing is listening on {target}: a stale socket file, left by a server that "
        "exited without removing it",
        tuple(facts),
        (
            "start the server again (udskit serve reclaims a stale file by itself)",
            f"or remove it: rm {quoted}",
        ),
    )


def _unexplained_denial(target: Address, info: FileInfo | None, me: UserInfo) -> Finding:
    acl = " It carries an ACL (getfacl shows it)." if info is not None and info.has_acl else ""
    return Finding(
        "permission",
        "problem",
        f"the kernel refused {me.name} access to {target} although the permission bits "
        f"allow it: a POSIX ACL or a security module (AppArmor, SELinux) denies it.{acl}",
        (),
        (
            f"getfacl {shlex.quote(target.path)}",
            "check the security module's log (journalctl -k | grep -i -e apparmor -e avc)",
        ),
    )
