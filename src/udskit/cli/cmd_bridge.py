"""``udskit bridge LISTEN TARGET``: relay every connection from LISTEN to TARGET."""

from __future__ import annotations

import argparse
import sys

from udskit import bridge

from ._options import add_listening, address, policy_for, positive_int
from .main import EXIT_OK

HELP = "relay connections between two addresses (TCP <-> Unix socket, abstract <-> path)"

EXAMPLE = """\
  udskit bridge tcp:127.0.0.1:8080 /run/app/gunicorn.sock   # expose a socket on TCP
  udskit bridge /run/db.sock tcp:127.0.0.1:5432             # a socket in front of TCP
  udskit bridge --mode 660 --group www-data /run/front.sock @backend
  udskit bridge --allow-uid www-data /run/app.sock tcp:127.0.0.1:8000

Prints 'listening on LISTEN -> TARGET' once it accepts connections (with the port the
kernel chose for tcp:HOST:0). SIGTERM or Ctrl-C stops it and removes its socket file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "listen", metavar="LISTEN", type=address, help="address to accept connections on"
    )
    parser.add_argument(
        "target", metavar="TARGET", type=address, help="address to relay each connection to"
    )
    add_listening(parser, "a LISTEN socket file")
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        metavar="N",
        help="relay at most N connections at once; more wait in the backlog (default: as "
        "many as the open-file limit leaves room for)",
    )


def run(args: argparse.Namespace) -> int:
    policy = policy_for(args)

    def started(running: bridge.Bridge) -> None:
        print(f"listening on {running.address} -> {running.target}", flush=True)

    bridge.run(
        args.listen,
        args.target,
        started=started,
        mode=args.mode,
        owner=args.owner,
        group=args.group,
        allow=policy,
        backlog=args.backlog,
        max_connections=args.max_connections,
    )
    print("udskit bridge: stopped", file=sys.stderr)
    return EXIT_OK
