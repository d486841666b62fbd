"""httpx clients and transports that reach a udskit address, whatever the URL says.

``httpx.HTTPTransport(uds=...)`` takes a path short enough for ``sun_path`` only, and its
connect errors are bare errno strings. These transports connect with udskit instead (long
paths, abstract names, ``tcp:``; failures explained: missing file, stale socket, permission
denied on which path), and keep httpx's connection pool, keep-alive, timeouts and HTTP/1.1
handling by plugging a network backend into httpcore, httpx's own engine.

The URL's scheme and host only fill in the request line and the ``Host`` header; every
connection goes to the address. Proxy environment variables are never used: :func:`client`
passes ``trust_env=False``, and httpx never applies proxies to an explicit transport.
TLS (``https://``) is not offered: a Unix socket is already private to the host.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any, Final

import httpcore
import httpx

import udskit

from ..address import Address, AddressLike
from ..bridge import connect_socket
from ..errors import Timeout, UdsError

__all__ = ["AsyncTransport", "Transport", "async_client", "async_transport", "client", "transport"]

#: The base URL of clients made here, so that ``client.get("/path")`` works.
BASE_URL: Final = "http://localhost"

_NO_TLS: Final = (
    "https:// is not supported over a udskit address (the socket is local to the host): use http://"
)

_SocketOptions = Iterable[Any] | None


class _Stream(httpcore.NetworkStream):
    """A connected socket as httpcore's blocking stream."""

    def __init__(self, channel: udskit.Channel) -> None:
        self._channel = channel
        self._sock = channel.socket

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(f"{self._where()}: no data within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(f"{self._where()}: {exc}") from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer, socket.MSG_NOSIGNAL)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(f"{self._where()}: send blocked for {timeout} s") from exc
        except OSError as exc:
            raise httpcore.WriteError(f"{self._where()}: {exc}") from exc

    def close(self) -> None:
        self._channel.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        self.close()  # httpcore leaves the stream to us when start_tls fails
        raise httpcore.ConnectError(_NO_TLS)

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "peer_cred":
            return self._channel.peer
        if info == "is_readable":
            return _is_readable(self._sock)
        return None

    def _where(self) -> str:
        return str(self._channel.address)


class _Backend(httpcore.NetworkBackend):
    """Every connection httpcore asks for goes to one udskit address."""

    def __init__(self, address: Address) -> None:
        self._address = address

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: _SocketOptions = None,
    ) -> httpcore.NetworkStream:
        return self._connect(timeout)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: _SocketOptions = None
    ) -> httpcore.NetworkStream:
        return self._connect(timeout)

    def _connect(self, timeout: float | None) -> httpcore.NetworkStream:
        try:
            channel = udskit.connect(self._address, framing="raw", timeout=timeout)
        except Timeout as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (UdsError, OSError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return _Stream(channel)


class _AsyncStream(httpcore.AsyncNetworkStream):
    """A connected non-blocking socket as httpcore's asyncio stream."""

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self._sock = sock
        self._address = address

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self._sock, max_bytes), timeout)
        except asyncio.TimeoutError as exc:
            raise httpcore.ReadTimeout(f"{self._address}: no data within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(f"{self._address}: {exc}") from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(self._sock, buffer), timeout)
        except asyncio.TimeoutError as exc:
            raise httpcore.WriteTimeout(f"{self._address}: send blocked for {timeout} s") from exc
        except OSError as exc:
            raise httpcore.WriteError(f"{self._address}: {exc}") from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        await self.aclose()  # httpcore leaves the stream to us when start_tls fails
        raise httpcore.ConnectError(_NO_TLS)

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _is_readable(self._sock)
        return None


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    """Every connection goes to one udskit address (asyncio only)."""

    def __init__(self, address: Address) -> None:
        self._address = address

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: _SocketOptions = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._connect(timeout)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: _SocketOptions = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._connect(timeout)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _connect(self, timeout: float | None) -> httpcore.AsyncNetworkStream:
        try:
            sock = await asyncio.wait_for(connect_socket(self._address), timeout)
        except asyncio.TimeoutError as exc:
            raise httpcore.ConnectTimeout(
                f"cannot connect to {self._address}: no answer within {timeout} s"
            ) from exc
        except (UdsError, OSError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return _AsyncStream(sock, self._address)


def _is_readable(sock: socket.socket) -> bool:
    """True if the socket has data or an end of stream waiting (an idle pooled connection
    that is readable was closed by the server, so httpcore discards it). Never waits."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Transport(httpx.HTTPTransport):
    """An ``httpx`` transport whose connections all go to a udskit address."""

    def __init__(
        self, address: AddressLike, *, limits: httpx.Limits | None = None, retries: int = 0
    ) -> None:
        where = Address.parse(address)
        chosen = limits or httpx.Limits()
        super().__init__(verify=False, trust_env=False)
        # httpx has no parameter for a network backend, so the pool it made is replaced by
        # one using ours; handle_request() and close() work on self._pool either way.
        self._pool = httpcore.ConnectionPool(
            max_connections=chosen.max_connections,
            max_keepalive_connections=chosen.max_keepalive_connections,
            keepalive_expiry=chosen.keepalive_expiry,
            retries=retries,
            network_backend=_Backend(where),
        )
        self.address = where


class AsyncTransport(httpx.AsyncHTTPTransport):
    """An ``httpx`` async transport (asyncio) whose connections all go to a udskit address."""

    def __init__(
        self, address: AddressLike, *, limits: httpx.Limits | None = None, retries: int = 0
    ) -> None:
        where = Address.parse(address)
        chosen = limits or httpx.Limits()
        super().__init__(verify=False, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(  # see Transport
            max_connections=chosen.max_connections,
            max_keepalive_connections=chosen.max_keepalive_connections,
            keepalive_expiry=chosen.keepalive_expiry,
            retries=retries,
            network_backend=_AsyncBackend(where),
        )
        self.address = where


def transport(address: AddressLike, **options: Any) -> Transport:
    """An ``httpx.HTTPTransport`` for ``address`` (options: ``limits``, ``retries``)."""
    return Transport(address, **options)


def async_transport(address: AddressLike, **options: Any) -> AsyncTransport:
    """An ``httpx.AsyncHTTPTransport`` for ``address`` (asyncio; ``limits``, ``retries``)."""
    return AsyncTransport(address, **options)


def client(address: AddressLike, *, timeout: float | None = 30.0, **options: Any) -> httpx.Client:
    """An ``httpx.Client`` talking to ``address``: ``client(sock).get("/health")``.

    ``options`` go to ``httpx.Client`` (``headers``, ``follow_redirects``, ...), except
    ``limits`` and ``retries``, which go to the transport.
    """
    pool = {key: options.pop(key) for key in ("limits", "retries") if key in options}
    return httpx.Client(
        transport=Transport(address, **pool),
        base_url=options.pop("base_url", BASE_URL),
        timeout=timeout,
        trust_env=False,
        **options,
    )


def async_client(
    address: AddressLike, *, timeout: float | None = 30.0, **options: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` (asyncio) talking to ``address``; see :func:`client`."""
    pool = {key: options.pop(key) for key in ("limits", "retries") if key in options}
    return httpx.AsyncClient(
        transport=AsyncTransport(address, **pool),
        base_url=options.pop("base_url", BASE_URL),
        timeout=timeout,
        trust_env=False,
        **options,
    )
