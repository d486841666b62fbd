"""A small WSGI application for the end-to-end tests, served by gunicorn.

Routes:
  /            "hello from gunicorn\\n"
  /echo        the request as JSON: method, path, query, body, selected headers, worker pid
  /bytes?n=N   N bytes of a repeating pattern (streamed in 64 KiB pieces)
  anything else: 404
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Any]

_PATTERN = bytes(range(256)) * 256  # 64 KiB


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        return _reply(start_response, "200 OK", b"hello from gunicorn\n", "text/plain")
    if path == "/echo":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size) if size else b""
        document = {
            "method": environ["REQUEST_METHOD"],
            "path": path,
            "query": environ.get("QUERY_STRING", ""),
            "body": body.decode("utf-8", "replace"),
            "host": environ.get("HTTP_HOST", ""),
            "content_type": environ.get("CONTENT_TYPE", ""),
            "x_test": environ.get("HTTP_X_TEST", ""),
            "user_agent": environ.get("HTTP_USER_AGENT", ""),
            "pid": os.getpid(),
        }
        return _reply(start_response, "200 OK", json.dumps(document).encode(), "application/json")
    if path == "/bytes":
        query = dict(
            part.split("=", 1) for part in environ.get("QUERY_STRING", "").split("&") if "=" in part
        )
        size = int(query.get("n", "0"))
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
        )
        return _pattern(size)
    return _reply(start_response, "404 Not Found", b"no such page\n", "text/plain")


def pattern(size: int) -> bytes:
    """The first ``size`` bytes /bytes serves, for checking what arrived."""
    return b"".join(_pattern(size))


def _pattern(size: int) -> Iterator[bytes]:
    while size > 0:
        piece = _PATTERN[: min(size, len(_PATTERN))]
        size -= len(piece)
        yield piece


def _reply(
    start_response: StartResponse, status: str, body: bytes, content_type: str
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
