"""``udskit send ADDR MSG...``: one-shot; with ``--reply``, wait for the answer and print it."""

from __future__ import annotations

import argparse
import os
from typing import Final

import udskit

from ._options import add_framing, add_type, address, framing_for, seconds
from ._output import HexDump, Output, as_line
from ._signals import exit_on_termination

HELP = "send each MSG to ADDR as one message; --reply waits for the answer and prints it"
EXAMPLE = """\
  udskit send --reply /tmp/echo.sock 'This is the message. This will be echoed back!'
  udskit send --type dgram /tmp/s1.sock hello DONE
  udskit send --type seqpacket --reply /tmp/s6.sock one two three
"""

#: How long --reply waits by default. A one-shot command in a script must not hang on a
#: server that never answers; any local server answers in far less.
DEFAULT_REPLY_TIMEOUT: Final = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="where to send")
    parser.add_argument("messages", metavar="MSG", nargs="+", help="the messages, in order")
    add_type(parser)
    add_framing(parser)
    parser.add_argument(
        "--reply",
        action="store_true",
        help=(
            "wait for the answers and print them: one per message, or on a raw stream "
            "everything until the server closes"
        ),
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        default=DEFAULT_REPLY_TIMEOUT,
        help=(
            "seconds to wait for the connection and for each answer "
            f"(default: {DEFAULT_REPLY_TIMEOUT:g})"
        ),
    )
    parser.add_argument(
        "-x", "--hexdump", action="store_true", help="hex dump of the traffic on stderr"
    )


def run(args: argparse.Namespace) -> int:
    framing = framing_for(args)
    raw = args.type == "stream" and framing == "raw"
    dump = HexDump() if args.hexdump else None
    out = Output()
    with (
        exit_on_termination(),
        udskit.connect(
            args.address, type=args.type, framing=framing, timeout=args.timeout
        ) as channel,
    ):
        for text in args.messages:
            # On a raw stream a message is a line, as `echo MSG | nc -U` sends it.
            message = as_line(os.fsencode(text)) if raw else os.fsencode(text)
            channel.send(message)
            if dump is not None:
                dump.sent(message)
            if args.reply and not raw:
                _show(out, dump, channel.recv(), lines=True)
        if args.reply and raw:
            # A raw stream has no message boundaries: say we are done, print all until EOF.
            channel.shutdown_write()
            for chunk in channel:
                _show(out, dump, chunk, lines=False)
    return 0


def _show(out: Output, dump: HexDump | None, message: bytes, *, lines: bool) -> None:
    if dump is not None:
        dump.received(message)
    out.write(as_line(message) if lines else message)
