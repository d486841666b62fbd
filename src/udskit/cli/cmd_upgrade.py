"""``udskit upgrade ADDR``: restart the server at ADDR without refusing a single client.

The server (``udskit serve --handover``, or a program with ``handover=True`` and a command
to start its successor) starts a copy of itself, which takes the listener over; the old one
finishes its clients and exits. This command returns once the new one serves.
"""

from __future__ import annotations

import argparse

from udskit.handover import UPGRADE_TIMEOUT, request_upgrade

from ._options import address, positive_seconds

HELP = "restart the server at ADDR in place: a new copy takes over its socket, none refused"
EXAMPLE = """\
  udskit serve --echo --handover /tmp/echo.sock &
  udskit upgrade /tmp/echo.sock
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="the server's socket path")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=positive_seconds,
        default=UPGRADE_TIMEOUT,
        help=f"give up if the new copy has not taken over after S seconds "
        f"(default: {UPGRADE_TIMEOUT:g}); the old one goes on serving",
    )


def run(args: argparse.Namespace) -> int:
    old, new = request_upgrade(args.address, timeout=args.timeout)
    print(f"{args.address}: pid {old} handed over to pid {new}")
    return 0
