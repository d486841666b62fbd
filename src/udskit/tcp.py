"""TCP connections for ``tcp:HOST:PORT`` addresses: the blocking connect, and the options
every udskit TCP connection gets, whichever API (blocking, asyncio, the bridge) made it.

Errors are not translated here: each caller raises them as its API's udskit errors.
"""

from __future__ import annotations

import socket

from .address import Address

__all__ = ["connect_tcp", "tcp_options"]


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
