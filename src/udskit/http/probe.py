"""Does the server at an address speak HTTP? One small request, a bounded wait, a verdict.

For ``udskit doctor``: once a socket accepts connections, the next question behind nginx is
whether it is the app server (HTTP) or something else that happens to sit at that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..address import Address, AddressLike
from ..errors import AddressError, Timeout, UdsError
from .exchange import USER_AGENT, open_exchange

__all__ = ["PROBE_TIMEOUT", "HttpProbe", "probe"]

#: Seconds the probe waits to connect and for the status line. An app server answers a HEAD
#: in milliseconds; one that takes longer is not what a diagnosis should wait on.
PROBE_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """What :func:`probe` found. ``speaks_http`` is True when a valid HTTP/1.x status line
    came back, whatever the status (a 404 or 405 is still HTTP)."""

    address: Address
    speaks_http: bool
    status: int | None = None
    reason: str = ""
    http_version: str = ""
    #: The ``Server`` header, when the server sent one (``gunicorn``, ``nginx``...).
    server: str | None = None
    #: One line: the status, or why the answer is not HTTP.
    detail: str = ""

    def __str__(self) -> str:
        return self.detail


def probe(address: AddressLike, *, timeout: float = PROBE_TIMEOUT, target: str = "/") -> HttpProbe:
    """Send ``HEAD target`` to ``address`` and report whether an HTTP response came back.

    Never raises for what the server does (refused, silent, closed, not HTTP): that is the
    result. Raises :class:`~udskit.AddressError` for a malformed address only.
    """
    where = Address.parse(address)
    headers = [("User-Agent", f"{USER_AGENT} (probe)"), ("Connection", "close")]
    try:
        with open_exchange(
            where, target, method="HEAD", headers=headers, timeout=timeout
        ) as exchange:
            head = exchange.head
    except AddressError:
        raise
    except Timeout:
        return HttpProbe(
            where,
            False,
            detail=f"no HTTP answer within {timeout:g} s (a silent server, or a busy one)",
        )
    except (UdsError, OSError) as exc:  # refused, denied, closed, not HTTP (ProtocolError)
        return HttpProbe(where, False, detail=str(exc))
    server = head.header("server")
    via = f" (server: {server})" if server else ""
    return HttpProbe(
        where,
        True,
        status=head.status,
        reason=head.reason,
        http_version=head.http_version,
        server=server,
        detail=f"speaks HTTP/{head.http_version}: HEAD {target} -> {head.status} "
        f"{head.reason}{via}".rstrip(),
    )
