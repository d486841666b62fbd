"""``udskit doctor ADDR [--as USER]``: connect, or explain exactly why not.

The reasoning lives in :func:`udskit.inspect.diagnose`; this module only prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from udskit import inspect

from ._options import TYPES
from ._output import Output
from ._wording import without_reprs

HELP = "explain why connecting to ADDR fails (or who serves it), with the exact fix"
EXAMPLE = """\
  udskit doctor /tmp/gunicorn.sock --as www-data
  udskit doctor --http /run/app/gunicorn.sock     (does the server answer HTTP?)
  udskit doctor @myapp
  udskit doctor --type dgram /tmp/s1.sock

  $ udskit doctor /tmp/demo/app.sock --as nobody
  doctor: /tmp/demo/app.sock for nobody (uid 65534, groups nogroup(65534))
  [problem] permission: nobody lacks write (w) permission on socket /tmp/demo/app.sock
      /tmp/demo/app.sock: srw------- root:root (mode 0600)
      fix: chgrp nogroup /tmp/demo/app.sock && chmod 660 /tmp/demo/app.sock
  ...
"""

#: Width of the status column, "[problem]" being the widest.
_STATUS_WIDTH = len("[problem]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address", metavar="ADDR", help="the socket to check: a path, @name or tcp:HOST:PORT"
    )
    parser.add_argument(
        "--as",
        dest="user",
        metavar="USER",
        help="judge for USER (name or uid) instead of ourselves, e.g. nginx's www-data",
    )
    parser.add_argument(
        "--type",
        choices=TYPES,
        default="stream",
        help="the socket type the client will use (default: stream)",
    )
    parser.add_argument("--json", action="store_true", help="the diagnosis as JSON")
    http = parser.add_mutually_exclusive_group()
    http.add_argument(
        "--http",
        action="store_true",
        help=(
            "also check that the server speaks HTTP, as nginx or curl need: send it one "
            "'HEAD /' request (without --http, doctor sends the server nothing)"
        ),
    )
    http.add_argument(
        "--no-http", action="store_true", help="no HTTP check (the default; kept for old scripts)"
    )


def run(args: argparse.Namespace) -> int:
    diagnosis = inspect.diagnose(args.address, user=args.user, type=args.type)
    # HTTP only when asked: a request is bytes in the server's log, and a server of another
    # protocol (PostgreSQL: "invalid startup packet") would log it as an error.
    if diagnosis.server is not None and args.type == "stream" and args.http:
        diagnosis = diagnosis.adding(http_finding(args.address))
    out = Output()
    if args.json:
        out.write((json.dumps(dataclasses.asdict(diagnosis), indent=2) + "\n").encode())
    else:
        out.write("".join(line + "\n" for line in render(diagnosis)).encode())
    return 0 if diagnosis.ok else 1


def http_finding(address: str) -> inspect.Finding:
    """Whether the server answering at ``address`` speaks HTTP (the question behind nginx's
    502s once the socket itself is reachable)."""
    try:
        from udskit import http
    except ModuleNotFoundError as exc:  # the h11 extra is missing: say how to get it
        return inspect.Finding("http", "info", f"HTTP check skipped: {exc}")
    found = http.probe(address)
    if found.speaks_http:
        return inspect.Finding("http", "ok", found.detail)
    return inspect.Finding(
        "http",
        "info",
        "the server gave no HTTP answer to 'HEAD /' (fine unless nginx or curl should reach it)",
        facts=(without_reprs(found.detail),),
    )


def render(diagnosis: inspect.Diagnosis) -> list[str]:
    """The diagnosis as lines of text: a heading, each finding, a verdict."""
    address = diagnosis.address or "''"  # an empty ADDR, named so that the lines still read
    lines = [f"doctor: {address} for {diagnosis.user}"]
    for finding in diagnosis.findings:
        status = f"[{finding.status}]".ljust(_STATUS_WIDTH)
        lines.append(f"{status} {finding.check}: {finding.summary}")
        lines.extend(f"    {fact}" for fact in finding.facts)
        lines.extend(f"    fix: {fix}" for fix in finding.fixes)
    who = diagnosis.user.name
    problems = len(diagnosis.problems)
    if diagnosis.ok:
        lines.append(f"=> {who} can connect to {address}")
    else:
        plural = "s" if problems > 1 else ""
        lines.append(f"=> {who} cannot connect to {address}: {problems} problem{plural}")
    return lines
