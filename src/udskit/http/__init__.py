"""HTTP/1.1 over udskit addresses: requests, an HTTP probe, and httpx clients.

Needs the ``http`` extra (``pip install 'udskit[http]'``): h11 for :func:`request`,
:func:`open_exchange` and :func:`probe`; httpx as well for :func:`client`,
:func:`transport` and their async forms, which are imported on first use. Without it,
importing this package raises ``ModuleNotFoundError`` whose message says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

__all__ = [
    "MISSING_EXTRA",
    "AsyncTransport",
    "Exchange",
    "HttpProbe",
    "Response",
    "ResponseHead",
    "Transport",
    "async_client",
    "async_transport",
    "client",
    "open_exchange",
    "probe",
    "request",
    "transport",
]

#: The one line shown when the extra is missing.
MISSING_EXTRA: Final = (
    "HTTP support needs the 'http' extra (h11 and httpx): pip install 'udskit[http]'"
)

try:
    import h11  # noqa: F401 - checked here so that the error names the extra
except ModuleNotFoundError as _exc:
    raise ModuleNotFoundError(MISSING_EXTRA, name=_exc.name) from _exc

# After the check above, so that a missing h11 is reported with the extra's name.
from .exchange import Exchange, Response, ResponseHead, open_exchange, request  # noqa: E402
from .probe import HttpProbe, probe  # noqa: E402

if TYPE_CHECKING:
    from .httpx_transport import (
        AsyncTransport,
        Transport,
        async_client,
        async_transport,
        client,
        transport,
    )

_HTTPX_NAMES: Final = frozenset(
    {"AsyncTransport", "Transport", "async_client", "async_transport", "client", "transport"}
)


def __getattr__(name: str) -> Any:
    # httpx is imported only when its helpers are used: the CLI and the probe need h11 only.
    if name not in _HTTPX_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import httpx_transport
    except ModuleNotFoundError as exc:
        if exc.name in ("httpx", "httpcore"):
            raise ModuleNotFoundError(MISSING_EXTRA, name=exc.name) from exc
        raise
    return getattr(httpx_transport, name)
