"""``udskit serve ADDR``: a server that answers every client with one action.

The socket file is claimed safely (a live server's socket is refused, a stale one
reclaimed, anything that is not a socket never touched) and removed when the server stops:
on Ctrl-C, SIGTERM, ``--until`` or ``--once``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
from types import FrameType

import udskit
from udskit.options import DEFAULT_MAX_CLIENTS

from . import _actions
from ._actions import Action, Session, Until
from ._options import (
    add_framing,
    add_hexdump,
    add_listening,
    add_type,
    address,
    framing_for,
    policy_for,
    positive_int,
)
from ._output import HexDump, Output, err
from .main import UsageError

HELP = "serve ADDR: echo, uppercase, print, reply or run a command for every client"
EXAMPLE = """\
  udskit serve --echo /tmp/echo.sock
  udskit serve --type dgram --print --until DONE /tmp/s1.sock
  udskit serve --reply 'thank you!' --backlog 128 /tmp/s5.sock
  udskit serve --upper -v /tmp/upper.sock                        shows each peer's uid
  udskit serve --exec 'tr a-z A-Z' --mode 660 --group www-data /run/app/app.sock
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="where to listen")
    add_type(parser)
    actions = parser.add_mutually_exclusive_group(required=True)
    actions.add_argument("--echo", action="store_true", help="send every message back")
    actions.add_argument("--upper", action="store_true", help="send it back in upper case")
    actions.add_argument("--print", action="store_true", help="print it on stdout")
    actions.add_argument("--reply", metavar="TEXT", help="answer every message with TEXT")
    actions.add_argument(
        "--exec",
        metavar="CMD",
        help=(
            "run CMD per connection (per datagram for --type dgram): the client's bytes go to "
            "its stdin, its stdout back to the client. CMD is split like a shell line but not "
            "run by a shell: write --exec \"sh -c '...'\" for pipes"
        ),
    )
    parser.add_argument(
        "--until",
        metavar="TEXT",
        help="stop (and remove the socket file) after a message equal to TEXT",
    )
    add_framing(parser)
    add_listening(parser, "the socket file")
    parser.add_argument(
        "--max-clients",
        metavar="N",
        type=positive_int,
        default=DEFAULT_MAX_CLIENTS,
        help=f"serve at most N clients at once; others wait in the backlog "
        f"(default: {DEFAULT_MAX_CLIENTS})",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help=(
            "stop after the first client (or datagram); a client that leaves without a byte "
            "either way, like the probe of 'udskit wait', does not count"
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="one line on stderr per client: pid, uid, gid, process name, address",
    )
    add_hexdump(parser)


def run(args: argparse.Namespace) -> int:
    framing = framing_for(args)
    raw = args.type == "stream" and framing == "raw"
    handler = _Handler(args, raw=raw, lines=framing == "lines")
    allow = policy_for(args)
    with _StopOnSignal() as stopper:
        # The handlers are in place before the socket exists: a SIGTERM sent as soon as
        # the socket answers must stop us cleanly, not kill us and leave the file behind.
        server = udskit.Server(
            args.address,
            handler,
            max_clients=1 if args.once else args.max_clients,
            type=args.type,
            framing=framing,
            mode=args.mode,
            owner=args.owner,
            group=args.group,
            allow=allow,
            backlog=args.backlog,
        )
        with server:
            handler.server = server
            stopper.server = server
            if args.verbose:
                shown = f", mode {args.mode:04o}" if server.listener.address.kind == "path" else ""
                err(f"serving {args.address} ({args.type}{shown}); Ctrl-C stops")
            if not stopper.requested:
                server.serve_forever()
    return 0


class _StopOnSignal:
    """SIGINT and SIGTERM stop the server cleanly (its socket file removed); the previous
    handlers come back afterwards."""

    def __init__(self) -> None:
        self.server: udskit.Server | None = None
        self.requested = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


class _Handler:
    """Called by the Server once per connection (per datagram for dgram)."""

    def __init__(self, args: argparse.Namespace, *, raw: bool, lines: bool) -> None:
        self.server: udskit.Server | None = None
        self._raw = raw
        self._lines = lines
        self._type: str = args.type
        self._until_text = None if args.until is None else os.fsencode(args.until)
        self._once: bool = args.once
        self._verbose: bool = args.verbose
        self._dump = HexDump() if args.hexdump else None
        self._command = _command(args.exec) if args.exec is not None else None
        self._action = _action(args, raw=raw)
        self._replies = not args.print  # every other action answers (--exec: its output)

    def __call__(self, channel: udskit.Channel) -> None:
        peer = channel.peer
        who = f"pid {peer.pid}" if peer is not None else ""
        if self._verbose:
            err(_describe(channel, replies=self._replies))
        session = Session(channel, who, self._dump)
        keep_going = True
        try:
            keep_going = self._serve(session)
        except udskit.UdsError:
            raise  # the Server reports these in one line and serves the next client
        except OSError as exc:  # a command that cannot start, an unwritable stdout, ...
            err(f"{who or 'a client'}: {_one_line(exc)}")
        finally:
            # --once: the first client that sent or got a byte was served, however it
            # ended (one that leaves before its echo, too); one that came and went without
            # a byte either way (a readiness probe) was not.
            if not keep_going or (self._once and session.exchanged.is_set()):
                self._stop()

    def _serve(self, session: Session) -> bool:
        until = Until(self._until_text, raw=self._raw)
        if self._command is None:
            return self._serve_messages(session, until)
        if self._type == "dgram":
            message = session.channel.recv()
            session.received(message)
            _actions.run_command_once(session, self._command, message)
            return until.feed(message) is None
        return _actions.run_command(session, self._command, until, lines=self._lines)

    def _serve_messages(self, session: Session, until: Until) -> bool:
        assert self._action is not None
        for message in session.channel:
            cut = until.feed(message)
            if cut is not None:
                message = message[:cut]
            session.received(message)
            if not self._action(session, message) or cut is not None:
                return False
        return not until.matched_at_eof()

    def _stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _action(args: argparse.Namespace, *, raw: bool) -> Action | None:
    if args.echo:
        return _actions.echo
    if args.upper:
        return _actions.upper
    if args.print:
        return _actions.make_print(Output(), raw=raw)
    if args.reply is not None:
        return _actions.make_reply(os.fsencode(args.reply), raw=raw)
    return None  # --exec: handled per connection


def _command(line: str) -> list[str]:
    """--exec CMD as an argument vector; the program must exist now, not at the first client."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"--exec {line!r}: {exc}") from None
    if not argv:
        raise UsageError("--exec needs a command, e.g. --exec 'tr a-z A-Z'")
    if shutil.which(argv[0]) is None:
        raise UsageError(
            f"--exec: command {argv[0]!r} not found (not executable, or not on PATH); "
            "give its full path"
        )
    return argv


def _one_line(exc: OSError) -> str:
    what = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return f"{what}: {exc.filename}" if exc.filename else what


def _describe(channel: udskit.Channel, *, replies: bool) -> str:
    """S7: the -v line, from the kernel's credentials (SO_PEERCRED / SCM_CREDENTIALS).

    A datagram from an unbound socket (socat UNIX-SENDTO, a client that never called
    bind) has no address to answer to: when the action would reply, the line says so,
    since the reply is dropped and the client waits for it in vain."""
    peer = channel.peer
    what = "datagram" if channel.type == "dgram" else "client"
    if channel.address is not None:
        where = f" address={channel.address}"
    elif channel.type == "dgram" and replies:
        where = (
            " (unbound sender: it cannot be answered; a client must bind an address to get replies)"
        )
    else:
        where = ""
    if peer is None:
        if channel.address is not None:
            return f"{what} from {channel.address}"
        return f"{what} from an unnamed peer{where}"
    return f"{what} pid={peer.pid} uid={peer.uid} gid={peer.gid} process={peer.process_name}{where}"
