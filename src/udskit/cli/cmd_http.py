"""``udskit http ADDR PATH``: one HTTP/1.1 request over a Unix socket, like
``curl --unix-socket``, without ever consulting proxy environment variables."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ._output import Output
from .main import EXIT_FAILURE, EXIT_OK, UsageError

if TYPE_CHECKING:
    from udskit.http import ResponseHead

HELP = "send an HTTP/1.1 request over a socket (curl --unix-socket); proxies never apply"

EXAMPLE = """\
  udskit http /run/app/gunicorn.sock /health
  udskit http -i /run/app/gunicorn.sock /api/items?page=2
  udskit http -X POST -H 'Content-Type: application/json' -d '{"a": 1}' @app /items
  udskit http -d @body.json /run/app.sock /upload         # body from a file (@- for stdin)
  udskit http --json /run/app.sock / | jq .status

The body is written to stdout as it arrives. Exit status: 0 when a response came back
(whatever its status; with -f, 1 for 4xx/5xx), 1 when no HTTP response did."""

#: Statuses from which --fail reports failure, as curl -f does.
_FAIL_FROM = 400

#: The Content-Type of a -d body unless -H gives one: curl's default, which form-handling
#: servers expect.
_FORM = "application/x-www-form-urlencoded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", help="server address: /path, @name, tcp:H:P")
    parser.add_argument(
        "path",
        metavar="PATH",
        help="request target, e.g. /health?full=1 (or a whole http:// URL for its host)",
    )
    parser.add_argument("-X", "--request", dest="method", metavar="METHOD", help="HTTP method")
    parser.add_argument(
        "-d",
        "--data",
        metavar="DATA",
        help="request body (default method POST); @FILE reads a file, @- stdin",
    )
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        metavar="'NAME: VALUE'",
        action="append",
        default=[],
        help="extra request header (repeatable)",
    )
    parser.add_argument(
        "-i", "--include", action="store_true", help="show the status line and headers too"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the response as one JSON object (status, reason, headers, body)",
    )
    parser.add_argument(
        "-f", "--fail", action="store_true", help="exit 1 when the status is 400 or above"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds for connect and for each read or write (default: 30)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from udskit import http
    except ModuleNotFoundError as exc:
        print(f"udskit http: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    target, headers = _target(args.path), _headers(args.headers)
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    body = _body(args.data)
    method = args.method or ("POST" if args.data is not None else "GET")
    given = {name.lower() for name, _ in headers}
    host = urlsplit(args.path).hostname if "://" in args.path else None
    if host and "host" not in given:
        headers.insert(0, ("Host", host))
    if args.data is not None and "content-type" not in given:
        headers.append(("Content-Type", _FORM))  # what curl -d sends
    out = Output()  # unbuffered; stops quietly when the reader goes away (| head)
    with http.open_exchange(
        args.address, target, method=method, headers=headers, body=body, timeout=args.timeout
    ) as exchange:
        head = exchange.head
        if args.json:
            out.write(_json(head, exchange.read()))
        else:
            if args.include:
                out.write(_head_text(head))
            for chunk in exchange.iter_body():
                if not out.write(chunk):
                    break
    return EXIT_FAILURE if args.fail and head.status >= _FAIL_FROM else EXIT_OK


def _target(path: str) -> str:
    if "://" in path:
        parts = urlsplit(path)
        if parts.scheme != "http":
            raise UsageError(f"only http:// URLs are supported over a socket, not {path!r}")
        target = parts.path or "/"
        return f"{target}?{parts.query}" if parts.query else target
    if not path.startswith("/") and path != "*":
        raise UsageError(f"PATH must start with '/' (e.g. /{path}), or be an http:// URL")
    return path


def _headers(values: list[str]) -> list[tuple[str, str]]:
    headers = []
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"-H takes 'Name: value', not {value!r}")
        headers.append((name.strip(), rest.strip()))
    return headers


def _body(data: str | None) -> bytes:
    if data is None:
        return b""
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        with open(data[1:], "rb") as f:
            return f.read()
    return data.encode()


def _head_text(head: ResponseHead) -> bytes:
    lines = [f"HTTP/{head.http_version} {head.status} {head.reason}".rstrip()]
    lines += [f"{name}: {value}" for name, value in head.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json(head: ResponseHead, body: bytes) -> bytes:
    document: dict[str, object] = {
        "status": head.status,
        "reason": head.reason,
        "http_version": head.http_version,
        "headers": [list(pair) for pair in head.headers],
    }
    try:
        document["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_base64"] = base64.b64encode(body).decode("ascii")
    return json.dumps(document).encode() + b"\n"
