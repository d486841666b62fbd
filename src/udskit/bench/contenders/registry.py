"""Every contender of ``udskit bench``, in the order the table lists them."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Final

import udskit

from .. import cbuild
from ..plan import Test
from .base import Contender, missing_module

__all__ = ["ALL", "BASELINE", "SPIN_US", "get", "native_build", "names"]

#: The contender every ratio is relative to.
BASELINE: Final = "stdlib"

#: Polling time of the spin contender, on both peers: several times a polled round trip
#: (~10 µs in Python), so that a reply is caught while polling rather than after a sleep;
#: far below udskit's MAX_SPIN_US.
SPIN_US: Final = 200

#: SO_SNDBUF/SO_RCVBUF of the large-buffer C reference (the 1 MiB comparison of the targets).
C_BUFFER: Final = 1 << 20

_BENCH_EXTRA: Final = "pip install 'udskit[bench]'"

_SPIN_NOT_MANY: Final = "polling is for one latency-critical peer, not a thousand handler threads"
_BATCH_STREAMS: Final = "batching is for streams of messages; this test has one in flight"
_NO_LOADER: Final = "the load generator speaks length-prefixed frames on a plain socket, not ZMTP"
_TWO_ONLY: Final = "a pipe joins exactly two processes"
_BUFFERS_STREAMS: Final = "socket buffer size matters for streams only"
_BUSY_ONE: Final = "busy-polling is for one latency-critical peer"
_MANY_ONLY: Final = "a message server is a many-clients server; the Channel rows cover one peer"
_NOT_LARGE: Final = (
    "large messages are measured for the shared-memory rows and their references only"
)
_LARGE_ONLY: Final = "a large-message row only"
_LARGE_SKIPS: Final[dict[Test, str]] = {
    "rtt": _LARGE_ONLY,
    "stream": _LARGE_ONLY,
    "many": _LARGE_ONLY,
}


def _shm(mode: str, label: str, description: str) -> Contender:
    return Contender(
        name=f"udskit-shm-{mode}",
        label=f"udskit shared memory {label}",
        description=description,
        module=f"{_PKG}.udskit_shm",
        transport="unix",
        options={"mode": mode},
        skips=_LARGE_SKIPS,
        requires=lambda: _needs_channel("recv_view", "loan"),
        large=True,
    )


@functools.cache
def native_build() -> cbuild.Build:
    """The C reference, compiled once per process (and cached on disk across runs)."""
    return cbuild.build()


def _needs_native() -> str | None:
    return native_build().reason or None


def _needs_channel(*attributes: str) -> str | None:
    missing = [name for name in attributes if not hasattr(udskit.Channel, name)]
    if missing:
        return f"udskit.Channel has no {', '.join(missing)} in udskit {udskit.__version__}"
    return None


def _needs_aio() -> str | None:
    try:
        aio = importlib.import_module("udskit.aio")
    except ImportError as exc:
        return f"udskit.aio cannot be imported: {exc}"
    missing = [name for name in ("listen", "connect", "Channel") if not hasattr(aio, name)]
    if missing:
        return f"udskit.aio has no {', '.join(missing)} in udskit {udskit.__version__}"
    return None


def _needs_aio_uvloop() -> str | None:
    return missing_module("uvloop", "pip install 'udskit[fast]'")() or _needs_aio()


_PKG: Final = "udskit.bench.contenders"

_DECLARED: Final = (
    Contender(
        name="stdlib",
        label="stdlib AF_UNIX",
        description="hand-written stdlib Python: blocking AF_UNIX stream socket, 4-byte "
        "length prefix, one recv_into per message when it has all arrived; echo server: "
        "selectors (epoll) (the baseline)",
        module=f"{_PKG}.stdlib",
        transport="unix",
    ),
    Contender(
        name="udskit",
        label="udskit Channel",
        description="udskit.listen/connect Channel, blocking, one send()/recv() per "
        "message; echo server: udskit.Server (a thread per client)",
        module=f"{_PKG}.udskit_sync",
        transport="unix",
    ),
    Contender(
        name="udskit-spin",
        label="udskit spin",
        description=f"udskit Channel with spin={SPIN_US} µs on both peers (polls before blocking)",
        module=f"{_PKG}.udskit_sync",
        transport="unix",
        options={"spin": SPIN_US},
        skips={"many": _SPIN_NOT_MANY},
        requires=lambda: _needs_channel("spin"),
    ),
    Contender(
        name="udskit-batch",
        label="udskit send_many",
        description="udskit Channel, send_many() of ~64 KiB batches, recv_many()",
        module=f"{_PKG}.udskit_sync",
        transport="unix",
        options={"batch": True},
        skips={"rtt": _BATCH_STREAMS, "many": _BATCH_STREAMS},
        requires=lambda: _needs_channel("send_many", "recv_many"),
    ),
    Contender(
        name="udskit-aio",
        label="udskit aio",
        description="udskit.aio Channel on the standard asyncio loop, one await send()/recv() "
        "per message; echo server: udskit.aio.start_server (a task per client)",
        module=f"{_PKG}.udskit_aio",
        transport="unix",
        options={"loop": "asyncio"},
        requires=_needs_aio,
    ),
    Contender(
        name="udskit-aio-uvloop",
        label="udskit aio uvloop",
        description="the same udskit.aio code on uvloop",
        module=f"{_PKG}.udskit_aio",
        transport="unix",
        options={"loop": "uvloop"},
        requires=_needs_aio_uvloop,
    ),
    Contender(
        name="udskit-msg",
        label="udskit MessageServer",
        description="echo server only: udskit.MessageServer, handler(conn, message) returning "
        "the reply",
        module=f"{_PKG}.udskit_msg",
        transport="unix",
        options={"api": "sync"},
        skips={"rtt": _MANY_ONLY, "stream": _MANY_ONLY},
    ),
    Contender(
        name="udskit-aio-msg",
        label="udskit aio MessageServer",
        description="echo server only: udskit.aio.start_message_server on the standard "
        "asyncio loop, handler(conn, message) returning the reply",
        module=f"{_PKG}.udskit_msg",
        transport="unix",
        options={"api": "aio", "loop": "asyncio"},
        skips={"rtt": _MANY_ONLY, "stream": _MANY_ONLY},
        requires=_needs_aio,
    ),
    Contender(
        name="udskit-aio-msg-uvloop",
        label="udskit aio MessageServer uvloop",
        description="the same udskit.aio.start_message_server echo server on uvloop",
        module=f"{_PKG}.udskit_msg",
        transport="unix",
        options={"api": "aio", "loop": "uvloop"},
        skips={"rtt": _MANY_ONLY, "stream": _MANY_ONLY},
        requires=_needs_aio_uvloop,
    ),
    Contender(
        name="asyncio",
        label="asyncio streams",
        description="asyncio streams (start_unix_server/open_unix_connection), readexactly "
        "framing, standard loop",
        module=f"{_PKG}.streams",
        transport="unix",
        options={"loop": "asyncio"},
    ),
    Contender(
        name="uvloop",
        label="uvloop streams",
        description="the same asyncio streams code on uvloop",
        module=f"{_PKG}.streams",
        transport="unix",
        options={"loop": "uvloop"},
        requires=missing_module("uvloop", _BENCH_EXTRA),
    ),
    Contender(
        name="mp",
        label="multiprocessing",
        description="multiprocessing.connection Listener/Client, family AF_UNIX, "
        "send_bytes/recv_bytes; echo server: connection.wait()",
        module=f"{_PKG}.mpconn",
        transport="unix",
    ),
    Contender(
        name="zmq",
        label="pyzmq ipc://",
        description="pyzmq over ipc://, REQ/REP round trips, PUSH/PULL streams",
        module=f"{_PKG}.pyzmq",
        transport="unix",
        skips={"many": _NO_LOADER},
        requires=missing_module("zmq", _BENCH_EXTRA),
    ),
    Contender(
        name="tcp",
        label="stdlib TCP",
        description="the stdlib code over TCP loopback (127.0.0.1, TCP_NODELAY)",
        module=f"{_PKG}.stdlib",
        transport="tcp",
        options={"family": "tcp"},
    ),
    Contender(
        name="pipe",
        label="os.pipe",
        description="the stdlib framing over two os.pipe() pipes, one each way",
        module=f"{_PKG}.pipes",
        transport="pipe",
        skips={"many": _TWO_ONLY},
    ),
    Contender(
        name="c",
        label="C",
        description="C reference (cc -O2): blocking AF_UNIX, sendmsg/recv, frames parsed in "
        "place; echo server: epoll, bytes echoed as they come",
        module=f"{_PKG}.native",
        transport="unix",
        requires=_needs_native,
        native=True,
    ),
    Contender(
        name="c-busy",
        label="C busy-poll",
        description="the C reference polling with MSG_DONTWAIT on both peers",
        module=f"{_PKG}.native",
        transport="unix",
        options={"busy": True},
        skips={"many": _BUSY_ONE},
        requires=_needs_native,
        native=True,
    ),
    Contender(
        name="c-1mib",
        label="C 1 MiB buffers",
        description="the C reference with SO_SNDBUF/SO_RCVBUF of 1 MiB",
        module=f"{_PKG}.native",
        transport="unix",
        options={"buffer": C_BUFFER},
        skips={"rtt": _BUFFERS_STREAMS, "many": _BUFFERS_STREAMS},
        requires=_needs_native,
        native=True,
        large=True,
    ),
    Contender(
        name="udskit-sock",
        label="udskit socket path",
        description="large messages: udskit Channel without shared memory (max_frame raised "
        "to the message size), send()/recv()",
        module=f"{_PKG}.udskit_shm",
        transport="unix",
        options={"mode": "socket"},
        skips=_LARGE_SKIPS,
        large=True,
    ),
    _shm(
        "copy",
        "copy-out",
        "large messages: udskit Channel with shared_memory= a pool of two messages (the "
        "memory bound), send() copies into the pool, recv() copies out to bytes",
    ),
    _shm(
        "view",
        "in place",
        "large messages: as udskit-shm-copy (a pool of two messages), send() copies into the "
        "pool, recv_view() reads in place (released at once)",
    ),
    _shm(
        "loan",
        "loan",
        "large messages: as udskit-shm-copy (a pool of two messages), the sender fills a "
        "loan() in place (no copy), recv_view() reads in place",
    ),
    Contender(
        name="mp-shm",
        label="shared_memory + pipe",
        description="large messages: hand-written multiprocessing.shared_memory ring of two "
        "slots, slot numbers and acks over two os.pipe() pipes; copy in, copy out",
        module=f"{_PKG}.mpshm",
        transport="pipe",
        skips=_LARGE_SKIPS,
        large=True,
    ),
)

#: Every contender; those that do not run large messages say why.
ALL: Final = tuple(
    c if c.large else dataclasses.replace(c, skips={**c.skips, "large": _NOT_LARGE})
    for c in _DECLARED
)

_BY_NAME: Final = {contender.name: contender for contender in ALL}


def names() -> list[str]:
    return [contender.name for contender in ALL]


def get(name: str) -> Contender:
    """The contender called ``name``; ValueError listing the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown contender {name!r}; choose from: {', '.join(names())}") from None
