"""``udskit wait ADDR``: return once ADDR accepts a connection (not merely exists)."""

from __future__ import annotations

import argparse
import time
from typing import Final

import udskit
from udskit import inspect

from ._options import TYPES, address, seconds

HELP = "wait until ADDR accepts a connection; exit 1 with the reason on timeout"
EXAMPLE = """\
  udskit serve --echo /tmp/echo.sock & udskit wait /tmp/echo.sock && udskit send /tmp/echo.sock hi
  udskit wait --timeout 5 @myapp
"""

#: Default for --timeout: long enough for a slow service start (a Python web app loading
#: its code), short enough that a script stuck on a server that never comes notices.
DEFAULT_TIMEOUT: Final = 30.0

#: Pause after the first failed attempt, doubling up to POLL_MAX: a server that is almost
#: up is noticed within milliseconds, one that takes long costs a few probes per second.
POLL_FIRST: Final = 0.005
POLL_MAX: Final = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="the address to wait for")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        help=f"give up after S seconds (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--type",
        choices=TYPES,
        default=None,
        help="wait for a server of this socket type (default: any)",
    )


def run(args: argparse.Namespace) -> int:
    target: udskit.Address = args.address
    if target.kind == "fd":
        raise udskit.AddressError(f"{target}: wait for a path, @name or tcp:HOST:PORT")
    deadline = time.monotonic() + args.timeout
    pause = POLL_FIRST
    while True:
        remaining = deadline - time.monotonic()
        attempt = inspect.try_connect(target, args.type, timeout=max(0.001, min(1.0, remaining)))
        if attempt.ok:
            return 0
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise udskit.Timeout(
                f"{target} did not accept a connection within {args.timeout:g} s; last "
                f"attempt: {attempt.reason}"
            )
        time.sleep(min(pause, remaining))  # back-off between probes
        pause = min(pause * 2, POLL_MAX)
