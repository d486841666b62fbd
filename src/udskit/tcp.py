"""TCP connections for ``tcp:HOST:PORT`` addresses: the blocking connect, the asyncio one,
and the options every udskit TCP connection gets, whichever API (blocking, asyncio, the
bridge) made it.

Errors are not translated here: each caller raises them as its API's udskit errors.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .address import Address

__all__ = ["connect_tcp", "open_tcp", "tcp_options"]


def tcp_options(sock: socket.socket) -> None:
    """Set what every udskit TCP connection has: TCP_NODELAY.

    Our messages are small framed writes, often a request answered by a reply. With Nagle's
    algorithm on, a small write waits for the ACK of the one before, and the peer delays
    that ACK (up to 40 ms on Linux), so every round trip would pay the delay.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_tcp(target: Address, timeout: float | None) -> socket.socket:
    """A connected blocking TCP socket to ``target``, with :func:`tcp_options` set.

    Every address ``target.host`` resolves to is tried in turn, each for up to ``timeout``
    seconds (None: as long as the kernel tries), as :func:`socket.create_connection` does;
    the socket keeps ``timeout`` for its sends and receives. Raises what it raises (OSError,
    ``socket.gaierror``, TimeoutError).
    """
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    try:
        tcp_options(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp(
    target: Address,
    timeout: float | None,
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A connected non-blocking TCP socket to ``target``, with :func:`tcp_options` set.

    As with :func:`connect_tcp`, every address ``target.host`` resolves to is tried in
    turn until one accepts; ``timeout`` bounds each attempt, and an attempt that runs out
    ends them all. ``prepare(sock)`` runs on each socket before it connects (to size its
    buffers, say). Raises ``socket.gaierror`` if the host does not resolve, TimeoutError
    (the builtin, on every Python), or the last address's OSError.
    """
    import asyncio  # here, not at the top: a blocking program need not load asyncio

    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        try:
            sock.setblocking(False)
            tcp_options(sock)
            if prepare is not None:
                prepare(sock)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            sock.close()
            raise TimeoutError(f"no answer from {sockaddr} within {timeout} s") from None
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    assert error is not None, "getaddrinfo returns at least one address or fails"
    raise error
