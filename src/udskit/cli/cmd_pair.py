"""``udskit pair -- CMD [ARGS]`` (S4): run CMD with the other end of a socket pair.

CMD inherits the descriptor; its number is in ``UDSKIT_FD`` (so CMD can use the address
``fd:$UDSKIT_FD``, or ``socat FD:$UDSKIT_FD ...``, or shell redirections). Our stdin goes
to CMD through the pair and what CMD writes to it comes to our stdout. CMD's own stdout
and stderr are ours too; its stdin is empty (ours feeds the socket). We exit with its code.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
from typing import Final

import udskit

from ._messages import line_limit
from ._options import add_hexdump, add_max_frame, max_frame_of
from ._output import HexDump, Output
from ._relay import Relay
from ._signals import exit_on_termination
from .main import UsageError

HELP = "run CMD with the other end of a socket pair (fd in $UDSKIT_FD), relaying stdin/stdout"
EXAMPLE = """\
  echo hello | udskit pair -- sh -c 'tr a-z A-Z <&$UDSKIT_FD >&$UDSKIT_FD'     (prints HELLO)
  udskit pair -- python3 child.py      child.py: udskit.connect(f"fd:{os.environ['UDSKIT_FD']}")
"""

#: The environment variable that tells CMD its descriptor's number.
FD_VARIABLE: Final = "UDSKIT_FD"

#: How long CMD may take to exit after we were interrupted, before it is killed.
INTERRUPT_GRACE: Final = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type",
        choices=("stream", "seqpacket"),
        default="stream",
        help="socket type (default: stream; a datagram pair has no end-of-stream to stop on)",
    )
    add_max_frame(parser, framings=False)
    add_hexdump(parser)
    parser.add_argument(
        "program",
        metavar="-- CMD [ARGS]",
        nargs=argparse.REMAINDER,
        help="the program to run, after --",
    )


def run(args: argparse.Namespace) -> int:
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("give the program to run after --, e.g. udskit pair -- cat")
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(errno.ENOENT, "command not found", argv[0])
    max_frame = max_frame_of(args, "raw")
    ours, theirs = udskit.pair(args.type, framing="raw", max_frame=max_frame)
    with exit_on_termination(), ours:
        with theirs:
            fd = theirs.fileno()
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                pass_fds=(fd,),
                env={**os.environ, FD_VARIABLE: str(fd)},
            )
        out = Output()
        try:
            Relay(
                ours,
                out,
                lines=args.type != "stream",
                dump=HexDump() if args.hexdump else None,
                max_line=line_limit(max_frame),
            ).run()
            if out.closed:
                # Nobody reads our output any more, so we read CMD's no more: CMD, if it
                # still writes, finds no reader either (EPIPE), as in a shell pipeline,
                # instead of waiting for us for ever.
                ours.close()
            code = process.wait()
        finally:
            _reap(process)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as shells do


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Never leave CMD behind: on an interruption it gets SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(INTERRUPT_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
