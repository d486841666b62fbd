"""``udskit connect ADDR``: stdin to the socket, the socket to stdout, like ``nc -U``."""

from __future__ import annotations

import argparse
import os

import udskit

from ._messages import line_limit
from ._options import (
    add_framing,
    add_hexdump,
    add_max_frame,
    add_type,
    address,
    framing_for,
    max_frame_of,
    seconds,
)
from ._output import HexDump, Output, err
from ._relay import DGRAM_LINGER, Relay
from ._signals import exit_on_termination
from .main import UsageError

HELP = "connect to ADDR: stdin goes to the socket, what comes back to stdout (like nc -U)"
EXAMPLE = """\
  udskit connect /tmp/echo.sock                  type lines, see the replies (Ctrl-D ends)
  printf 'hello\\n' | udskit connect /tmp/echo.sock
  udskit connect --type dgram /tmp/s1.sock       each line one datagram
  udskit connect --bind /tmp/client.sock /tmp/upper.sock
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="where to connect")
    add_type(parser)
    add_framing(parser)
    add_max_frame(parser)
    parser.add_argument(
        "--bind",
        metavar="PATH",
        type=address,
        help="bind our end to PATH (or @name) first, so the server sees who we are",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        help=(
            "seconds to wait for the connection; for --type dgram also how long to wait for "
            f"replies once stdin ends (default: {DGRAM_LINGER})"
        ),
    )
    parser.add_argument(
        "--no-shutdown",
        dest="half_close",
        action="store_false",
        help=(
            "at the end of stdin, keep our side open until the server closes, as plain nc -U "
            "does (by default we half-close, as nc -N: some servers, nginx among them, take "
            "that for a client that left and stop answering)"
        ),
    )
    add_hexdump(parser)


def run(args: argparse.Namespace) -> int:
    if args.type == "dgram" and not args.half_close:
        raise UsageError(
            "--no-shutdown applies to stream and seqpacket sockets; a datagram socket has no "
            "end of stream to send or hold back (drop --no-shutdown)"
        )
    framing = framing_for(args)
    max_frame = max_frame_of(args, framing)
    with exit_on_termination():
        _relay(args, framing, max_frame)
    return 0


def _relay(args: argparse.Namespace, framing: str, max_frame: int | None) -> None:
    channel = udskit.connect(
        args.address,
        type=args.type,
        framing=framing,
        max_frame=max_frame,
        timeout=args.timeout,
        bind=args.bind,
    )
    with channel:
        channel.settimeout(None)  # --timeout bounds the connect, not an idle conversation
        if os.isatty(0):
            _greet(channel)
        relay = Relay(
            channel,
            Output(),
            lines=args.type != "stream" or framing != "raw",
            dump=HexDump() if args.hexdump else None,
            linger=DGRAM_LINGER if args.timeout is None else args.timeout,
            max_line=line_limit(max_frame),
            half_close=args.half_close,
        )
        relay.run()


def _greet(channel: udskit.Channel) -> None:
    """On a terminal, say where we are and how to stop (stderr: stdout stays the data)."""
    peer = channel.peer
    who = f", server pid {peer.pid} ({peer.process_name}) uid {peer.uid}" if peer else ""
    unit = "each line is one datagram" if channel.type == "dgram" else "type lines"
    err(f"connected to {channel.address} ({channel.type}{who}); {unit}, Ctrl-D ends")
