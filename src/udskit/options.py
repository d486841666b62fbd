"""Validation of the options shared by ``listen``, ``connect``, ``serve`` and ``pair``.

Bad values are caught here, before any socket exists, with a message that names the option,
the value and what is accepted.
"""

from __future__ import annotations

import difflib
import grp
import math
import pwd
import socket
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from .address import Address
from .ancillary import MAX_FDS_PER_MESSAGE
from .creds import Policy
from .proto import DEFAULT_MAX_FRAME
from .proto.shm import CONTROL_BIT, check_pool_size

__all__ = [
    "ConnectOptions",
    "ListenOptions",
    "connect_options",
    "listen_options",
    "pair_options",
    "DEFAULT_BACKLOG",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_MESSAGE",
    "SocketType",
    "check_buffer",
    "tune_buffers",
    "DEFAULT_STREAM_BUFFER",
    "base_type",
    "check_backlog",
    "check_framing",
    "check_max_clients",
    "check_max_fds",
    "check_message",
    "check_mode",
    "check_timeout",
    "max_frame_for",
    "resolve_gid",
    "resolve_uid",
    "socket_kind",
]

SocketType: TypeAlias = Literal["stream", "seqpacket", "dgram"]

#: listen() backlog. The kernel caps it at net.core.somaxconn (4096 since Linux 5.4); 128 is
#: the old somaxconn and what the seeds use (S5): enough for bursts of local clients, and a
#: full backlog shows up as EAGAIN for non-blocking clients (nginx's 502 "(11: Resource
#: temporarily unavailable)") rather than as silent queueing.
DEFAULT_BACKLOG: Final = 128

#: Clients a server (``udskit.Server``, ``udskit.aio.Server``) serves at once unless
#: ``max_clients`` says otherwise. The threaded server's thread per client costs a
#: kernel task: tasks come from pid_max, 32,768 by default on machines with up to 32 CPUs and
#: shared by the whole system, and each thread's stack takes two of the process's 65,530
#: memory maps (vm.max_map_count). Past those limits a new thread fails at an arbitrary
#: moment ("can't start new thread"); half of the smallest default pid_max keeps well inside
#: them, while holding the 10,000 clients this server is meant to hold. Clients beyond it
#: wait in the backlog until one leaves.
DEFAULT_MAX_CLIENTS: Final = 16_384

#: How long a server that handed its listener over (``handover=True``) goes on serving the
#: clients it has before it closes them and returns. Long enough for requests in flight and
#: short conversations to end on their own; well inside the 90 s a service manager waits for
#: a stopping service by default (systemd's TimeoutStopSec), so the old process is gone
#: before anyone kills it.
DEFAULT_DRAIN_TIMEOUT: Final = 30.0

#: Largest seqpacket message or datagram received by default. Linux bounds one AF_UNIX
#: datagram by the sender's SO_SNDBUF (net.core.wmem_default is 212,992 bytes); 256 KiB
#: receives anything a default-configured sender can send. Larger ones fail as MSG_TRUNC.
DEFAULT_MAX_MESSAGE: Final = 256 * 1024

_KINDS: Final[dict[str, int]] = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


def socket_kind(type: object) -> int:  # noqa: A002 - mirrors the public keyword
    if isinstance(type, str) and type in _KINDS:
        return _KINDS[type]
    choose = "choose type='stream', 'seqpacket' or 'dgram'"
    if isinstance(type, int) and not isinstance(type, bool):
        # socket.SOCK_DGRAM is what the socket module has taught: name the word for it,
        # in the caller's terms (its repr, <SocketKind.SOCK_DGRAM: 2>, is not).
        shown = (
            f"socket.{type.name}" if isinstance(type, socket.SocketKind) else f"the number {type}"
        )
        for name, kind in _KINDS.items():
            if kind == type:
                raise ValueError(f"type= takes a name, not {shown}: write type={name!r}")
        raise ValueError(f"unknown socket type {shown}: {choose}")  # noqa: TRY004 - below
    if not isinstance(type, str):
        # ValueError, as it always was for every bad type=: a caller catches one class
        raise ValueError(f"type= takes a name, not a {type.__class__.__name__}: {choose}")  # noqa: TRY004
    similar = difflib.get_close_matches(type.lower(), list(_KINDS), n=1, cutoff=0.5)
    hint = f" (did you mean type={similar[0]!r}?)" if similar else ""
    raise ValueError(f"unknown socket type {type!r}: {choose}{hint}")


def type_name(kind: int) -> SocketType:
    for name, value in _KINDS.items():
        if value == kind:
            return name  # type: ignore[return-value]
    raise ValueError(f"unsupported socket type {kind}: udskit speaks stream, seqpacket, dgram")


#: SO_SNDBUF/SO_RCVBUF for stream sockets unless told otherwise. Linux's default
#: (net.core.wmem_default, 212,992 bytes) caps how much a writer can queue before it blocks,
#: so a large transfer stalls on a wake-up every ~200 KiB. Measured with
#: benchmarks/socket_buffers.py (reader and writer pinned to two CPUs), 1 MiB moved 4 KiB,
#: 64 KiB and 1 MiB messages 1.26x, 1.49x and 1.27x faster than the default; 256 KiB did
#: almost as well and 4 MiB worse (1.0-1.2x). Unprivileged processes are clamped to
#: net.core.wmem_max/rmem_max without an error, so asking for 1 MiB is always safe.
DEFAULT_STREAM_BUFFER: Final = 1024 * 1024

#: Largest buffer size we let callers ask for; past this the kernel clamps anyway.
MAX_BUFFER: Final = 64 * 1024 * 1024


def check_buffer(name: str, size: int | None) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BUFFER:
        raise ValueError(
            f"{name} must be a byte count from 0 (the kernel's default) to {MAX_BUFFER}, "
            f"not {size!r}"
        )
    return size


def tune_buffers(sock: socket.socket, sndbuf: int | None, rcvbuf: int | None) -> None:
    """Apply buffer sizes: None means our default for streams, 0 the kernel's default."""
    stream = base_type(sock) == socket.SOCK_STREAM
    for option, size in ((socket.SO_SNDBUF, sndbuf), (socket.SO_RCVBUF, rcvbuf)):
        if size is None and stream:
            size = DEFAULT_STREAM_BUFFER
        if size:
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def base_type(sock: socket.socket) -> int:
    """The socket's type without the SOCK_CLOEXEC/SOCK_NONBLOCK flags."""
    return int(sock.type) & ~(socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)


def check_framing(framing: str) -> str:
    if framing not in ("length", "lines", "raw"):
        raise ValueError(f"unknown framing {framing!r}: choose 'length', 'lines' or 'raw'")
    return framing


def max_frame_for(type: str, max_frame: int | None) -> int:  # noqa: A002
    if max_frame is None:
        return DEFAULT_MAX_FRAME if type == "stream" else DEFAULT_MAX_MESSAGE
    if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame <= 0:
        raise ValueError(f"max_frame must be a positive number of bytes, not {max_frame!r}")
    return max_frame


def check_max_fds(max_fds: int) -> int:
    if isinstance(max_fds, bool) or not isinstance(max_fds, int) or not 0 <= max_fds <= 253:
        raise ValueError(
            f"max_fds must be from 0 to 253 (the kernel's SCM_MAX_FD), not {max_fds!r}; "
            f"the default is {MAX_FDS_PER_MESSAGE}"
        )
    return max_fds


def check_max_clients(max_clients: int | None, name: str = "max_clients") -> int | None:
    """None (no limit) or a positive number of clients served at once; ``name`` is the
    keyword the caller took it as, for the error."""
    if max_clients is not None and (
        isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1
    ):
        raise ValueError(
            f"{name} must be a positive integer or None (no limit), not {max_clients!r}"
        )
    return max_clients


def check_shared_memory(
    shared_memory: object,
    *,
    type: str,  # noqa: A002 - mirrors the public keyword
    framing: str,
    max_fds: int,
    max_frame: int | None,
    address_kind: str | None = None,
) -> int:
    """The pool size a ``shared_memory=`` option asks for (0: off), checked against the
    other options; ValueError says which combination cannot work."""
    size = check_pool_size(shared_memory)
    if not size:
        return 0
    if type == "dgram" or (type == "stream" and framing != "length"):
        raise ValueError(
            "shared_memory needs type='stream' with framing='length' (the records that carry "
            "slots are length-prefixed frames) or type='seqpacket' (tagged packets), not "
            + (f"type={type!r}" if type == "dgram" else f"framing={framing!r}")
        )
    if max_fds < 1:
        raise ValueError(
            "shared_memory needs max_fds of at least 1: each side's pool arrives as a descriptor"
        )
    if type == "stream" and max_frame_for(type, max_frame) >= CONTROL_BIT:
        raise ValueError(f"max_frame must be below {CONTROL_BIT} with shared_memory")
    if address_kind == "tcp":
        raise ValueError("shared_memory works between processes on one host: not over tcp:")
    return size


def check_client_shared_memory(
    shared_memory: object,
    *,
    type: str,  # noqa: A002 - mirrors the public keyword
    framing: str,
    max_fds: int,
    max_frame: int | None,
    address_kind: str,
    binds: bool,
) -> int:
    """:func:`check_shared_memory` for a client, which signals its opt-in by the name it
    binds: so not with a name of the caller's (``bind=``) or an inherited socket."""
    pool = check_shared_memory(
        shared_memory,
        type=type,
        framing=framing,
        max_fds=max_fds,
        max_frame=max_frame,
        address_kind=address_kind,
    )
    if pool and (binds or address_kind == "fd"):
        raise ValueError(
            "shared_memory cannot be combined with bind= or an fd: address: the client "
            "signals its opt-in by the name it binds (docs/shared-memory.md)"
        )
    return pool


def check_timeout(timeout: float | None) -> float | None:
    """None (wait forever) or a finite number of seconds, at least 0."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 <= timeout < math.inf  # also refuses NaN
    ):
        raise ValueError(f"timeout must be None or >= 0 seconds (finite), not {timeout!r}")
    return timeout


def check_seconds(name: str, value: float) -> float:
    """A positive, finite number of seconds; ``name`` is the caller's keyword."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < math.inf  # also refuses NaN
    ):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def check_backlog(backlog: int) -> int:
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
        raise ValueError(f"backlog must be a positive integer, not {backlog!r}")
    return backlog


#: The permission bits a socket file uses: read and write (and execute, which connect()
#: ignores) for owner, group and others. setuid, setgid and sticky (0o7000) mean nothing
#: on a socket: a mode with them is a mistake, most often a decimal number written where
#: an octal one was meant (mode=660 is 0o1224).
SOCKET_MODE_BITS: Final = 0o777

#: The digits of a permission number, as people write it for chmod.
_OCTAL_DIGITS: Final = frozenset("01234567")


def check_mode(mode: int) -> int:
    """A socket file's permission number, 0 to 0o777; a decimal look-alike is refused with
    the octal number it probably meant."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode < 0:
        raise ValueError(f"mode must be a permission number like 0o660, not {mode!r}")
    if mode <= SOCKET_MODE_BITS:
        return mode
    digits = str(mode)
    # 660 or 4755 written in decimal: as an octal number it would have more digits or be
    # over 0o7777 (a four-digit number up to 4095 may be either: judged as octal below).
    decimal = len(digits) <= 3 or (len(digits) == 4 and mode > 0o7777)
    if decimal and set(digits) <= _OCTAL_DIGITS:
        meant = int(digits, 8) & SOCKET_MODE_BITS
        raise ValueError(
            f"mode={mode} is a decimal number ({mode:#o} in octal, with setuid/setgid/sticky "
            f"bits, which make no sense on a socket): did you mean {meant:#o}?"
        )
    if mode <= 0o7777:
        raise ValueError(
            f"mode={mode:#o} has setuid/setgid/sticky bits, which make no sense on a socket; "
            f"use {mode & SOCKET_MODE_BITS:#o}"
        )
    raise ValueError(f"mode must be a permission number from 0 to 0o777 like 0o660, not {mode!r}")


def check_message(data: object, what: str) -> None:
    """Refuse what cannot be a message before any byte is sent; ``what`` names the call
    (``"send"``, ``"send_many"``, ``"send_fds"``...) for the message.

    A message is bytes-like: ``bytes``, ``bytearray``, ``memoryview`` or anything else with
    the buffer protocol (``array.array``, a NumPy array). A ``str`` is refused with the fix,
    since text has no bytes until it is encoded. Cheap for bytes (one isinstance check), so
    a send path may call it first; it never inspects the content.
    """
    if isinstance(data, (bytes, bytearray)):
        return
    if isinstance(data, str):
        raise TypeError(f"{what}: messages are bytes, not str; encode text first (data.encode())")
    try:
        view = data if isinstance(data, memoryview) else memoryview(data)  # type: ignore[arg-type]
        contiguous = view.c_contiguous
    except TypeError:
        raise TypeError(
            f"{what}: messages are bytes-like (bytes, bytearray, memoryview), not "
            f"{type(data).__name__}"
        ) from None
    except ValueError:  # a released memoryview: a loan is released by the send() that sent it
        raise ValueError(
            f"{what}: this memoryview was released and holds no bytes any more (a loan is "
            "released by the send() that sends it): take a new loan or buffer"
        ) from None
    if not contiguous:
        raise TypeError(
            f"{what}: a message is one contiguous block of memory, and this "
            f"{type(data).__name__} is not (a slice with a step, or a transposed array); "
            "pass bytes(data), or numpy.ascontiguousarray(data)"
        )


def resolve_uid(owner: int | str | None) -> int:
    """A uid from a user name or number; -1 for 'leave as is'."""
    if owner is None:
        return -1
    if isinstance(owner, int) and not isinstance(owner, bool) and owner >= 0:
        return owner
    if isinstance(owner, str) and owner.isdigit():
        return int(owner)
    if isinstance(owner, str) and owner:
        try:
            return pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise ValueError(
                f"unknown user {owner!r} for owner= (not in the passwd database); "
                "give a name or uid"
            ) from None
    raise ValueError(f"owner must be a user name or uid, not {owner!r}")


def resolve_gid(group: int | str | None) -> int:
    """A gid from a group name or number; -1 for 'leave as is'."""
    if group is None:
        return -1
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        return group
    if isinstance(group, str) and group.isdigit():
        return int(group)
    if isinstance(group, str) and group:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(
                f"unknown group {group!r} for group= (not in the group database); "
                "give a name or gid"
            ) from None
    raise ValueError(f"group must be a group name or gid, not {group!r}")


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """The options of a ``connect()``, checked; shared by the blocking and asyncio layers."""

    target: Address
    kind: int
    framing: str
    max_frame: int | None
    max_fds: int
    timeout: float | None
    bind: Address | None
    expect_uid: int | None
    sndbuf: int | None
    rcvbuf: int | None


def connect_options(
    address: object,
    *,
    type: str,  # noqa: A002 - mirrors the public keyword
    framing: str,
    max_frame: int | None,
    max_fds: int,
    timeout: float | None,
    bind: object,
    expect_uid: int | None,
    sndbuf: int | None,
    rcvbuf: int | None,
) -> ConnectOptions:
    """Check every option of a connect before any socket exists; ValueError names the bad one."""
    target = Address.parse(address)  # type: ignore[arg-type]
    kind = socket_kind(type)
    check_framing(framing)
    check_max_fds(max_fds)
    max_frame_for(type, max_frame)
    if expect_uid is not None and (
        isinstance(expect_uid, bool) or not isinstance(expect_uid, int) or expect_uid < 0
    ):
        raise ValueError(f"expect_uid must be a uid (an integer >= 0) or None, not {expect_uid!r}")
    own = Address.parse(bind) if bind is not None else None  # type: ignore[arg-type]
    if own is not None and own.kind not in ("path", "abstract"):
        raise ValueError(f"bind= takes a Unix path or @name, not {own}")
    # Both were ignored before: a TCP connection is always a stream, and has no Unix name.
    if target.kind == "tcp" and kind != socket.SOCK_STREAM:
        raise ValueError(f"{target}: TCP addresses take type='stream' only")
    if own is not None and target.kind not in ("path", "abstract"):
        raise ValueError(f"bind= names our end of a Unix socket; {target} is not one (drop bind=)")
    return ConnectOptions(
        target,
        kind,
        framing,
        max_frame,
        max_fds,
        check_timeout(timeout),
        own,
        expect_uid,
        check_buffer("sndbuf", sndbuf),
        check_buffer("rcvbuf", rcvbuf),
    )


def pair_options(
    *,
    type: str,  # noqa: A002 - mirrors the public keyword
    framing: str,
    max_frame: int | None,
    max_fds: int,
    sndbuf: int | None,
    rcvbuf: int | None,
) -> int:
    """Check the options of a ``pair()``; return the socket type's constant."""
    kind = socket_kind(type)
    check_framing(framing)
    check_max_fds(max_fds)
    max_frame_for(type, max_frame)
    check_buffer("sndbuf", sndbuf)
    check_buffer("rcvbuf", rcvbuf)
    return kind


def _check_fileless(target: Address, *, owner: object, group: object, allow: Policy | None) -> None:
    """Refuse what would be silently ignored on an address with no socket file: an owner
    for a file that does not exist, a policy on clients that carry no credentials."""
    if target.kind == "tcp" and allow is not None:
        raise ValueError(
            f"cannot apply an access policy on {target}: TCP clients carry no credentials; "
            "listen on a Unix socket to restrict clients by uid or gid"
        )
    if target.kind not in ("tcp", "abstract"):
        return
    what, instead = (
        ("an abstract name", "pass allow= to choose who may connect")
        if target.kind == "abstract"
        else ("a TCP port", "listen on a socket file to choose who may connect")
    )
    for name, value in (("owner", owner), ("group", group)):
        if value is not None:
            raise ValueError(
                f"{name}= sets the owner of a socket file, and {target} is {what}, with no "
                f"file; {instead}"
            )


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """The options of a ``listen()``, checked; shared by the blocking and asyncio layers."""

    target: Address
    kind: int
    backlog: int
    mode: int
    uid: int
    gid: int
    allow: Policy | None
    framing: str
    max_frame: int | None
    #: max_frame with the socket type's default filled in (the datagram receive buffer).
    limit: int
    max_fds: int
    buffers: tuple[int | None, int | None]


def listen_options(
    address: object,
    *,
    type: str,  # noqa: A002 - mirrors the public keyword
    backlog: int,
    mode: int,
    owner: int | str | None,
    group: int | str | None,
    allow: Policy | None,
    framing: str,
    max_frame: int | None,
    max_fds: int,
    sndbuf: int | None,
    rcvbuf: int | None,
) -> ListenOptions:
    """Check every option of a listen before any socket exists; ValueError names the bad one."""
    target = Address.parse(address)  # type: ignore[arg-type]
    kind = socket_kind(type)
    check_framing(framing)
    check_backlog(backlog)
    check_mode(mode)
    check_max_fds(max_fds)
    buffers = (check_buffer("sndbuf", sndbuf), check_buffer("rcvbuf", rcvbuf))
    limit = max_frame_for(type, max_frame)
    uid, gid = resolve_uid(owner), resolve_gid(group)
    if allow is not None and not isinstance(allow, Policy):
        raise ValueError(f"allow must be a udskit.Policy or None, not {allow!r}")
    _check_fileless(target, owner=owner, group=group, allow=allow)
    return ListenOptions(
        target, kind, backlog, mode, uid, gid, allow, framing, max_frame, limit, max_fds, buffers
    )
