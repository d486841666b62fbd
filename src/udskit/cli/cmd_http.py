"""``udskit http ADDR PATH``: one HTTP/1.1 request over a Unix socket, like
``curl --unix-socket``, without ever consulting proxy environment variables."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import stat
import sys
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from ._options import address, positive_seconds
from ._output import Output
from .main import EXIT_FAILURE, EXIT_OK, UsageError

if TYPE_CHECKING:
    from udskit.http import ResponseHead
    from udskit.http.body import RequestBody

HELP = "send an HTTP/1.1 request over a socket (curl --unix-socket); proxies never apply"

EXAMPLE = """\
  udskit http /run/app/gunicorn.sock /health
  udskit http -i /run/app/gunicorn.sock /api/items?page=2
  udskit http -X POST -H 'Content-Type: application/json' -d '{"a": 1}' @app /items
  udskit http -d @big.tar /run/app.sock /upload          # streamed from the file (@- stdin)
  udskit http --max-time 10 /run/app.sock /report        # the whole exchange within 10 s
  udskit http --json /run/app.sock / | jq .status

The body is sent while the response is read, as curl does: an early answer (a 413) is shown.
The response body is written to stdout as it arrives. Exit status: 0 when a response came
back (whatever its status; with -f, 1 for 4xx/5xx), 1 when no HTTP response did."""

#: Statuses from which --fail reports failure, as curl -f does.
_FAIL_FROM = 400

#: The Content-Type of a -d body unless -H gives one: curl's default, which form-handling
#: servers expect.
_FORM = "application/x-www-form-urlencoded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address", metavar="ADDR", type=address, help="server address: /path, @name, tcp:H:P"
    )
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
        help="request body (default method POST); @FILE streams a file, @- reads stdin",
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
        "-f",
        "--fail",
        action="store_true",
        help="exit 1, and say so on stderr, when the status is 400 or above",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="seconds for connect and for each wait to read or write (default: 30)",
    )
    parser.add_argument(
        "--max-time",
        type=positive_seconds,
        metavar="S",
        help="seconds for the whole exchange, until the body has arrived (default: no limit)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from udskit import http  # noqa: F401 - here so that a missing extra is one line
    except ModuleNotFoundError as exc:
        print(f"udskit http: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    target, headers = _target(args.path), _headers(args.headers)
    with contextlib.ExitStack() as files:
        return _exchange(args, target, headers, _body(args.data, files))


def _exchange(
    args: argparse.Namespace, target: str, headers: list[tuple[str, str]], body: RequestBody
) -> int:
    from udskit.http import open_exchange

    method = args.method or ("POST" if args.data is not None else "GET")
    given = {name.lower() for name, _ in headers}
    host = urlsplit(args.path).hostname if "://" in args.path else None
    if host and "host" not in given:
        headers.insert(0, ("Host", host))
    if args.data is not None and "content-type" not in given:
        headers.append(("Content-Type", _FORM))  # what curl -d sends
    out = Output()  # unbuffered; stops quietly when the reader goes away (| head)
    with open_exchange(
        args.address,
        target,
        method=method,
        headers=headers,
        body=body,
        timeout=args.timeout,
        max_time=args.max_time,
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
    if args.fail and head.status >= _FAIL_FROM:
        # As curl -f (the body is still shown, as with curl --fail-with-body).
        print(
            f"udskit http: {method} {target} returned {head.status} {head.reason}".rstrip(),
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _target(path: str) -> str:
    if "://" in path:
        try:
            parts = urlsplit(path)
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 host
            raise UsageError(f"PATH {path!r} is not a valid URL ({exc})") from None
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


def _body(data: str | None, files: contextlib.ExitStack) -> RequestBody:
    """The -d body: text, or a file streamed as the server reads it. A pipe (stdin, or
    ``@<(command)``) is read whole first, as curl does, so that the request carries a
    Content-Length, which some servers require."""
    if data is None:
        return b""
    if not data.startswith("@"):
        return data.encode()
    if data == "@-":
        source: BinaryIO = sys.stdin.buffer
    else:
        try:
            source = files.enter_context(open(data[1:], "rb"))  # noqa: SIM115 - closed by files
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OSError(f"cannot read the body of -d {data}: {reason}") from exc
    return source if stat.S_ISREG(os.fstat(source.fileno()).st_mode) else source.read()


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
