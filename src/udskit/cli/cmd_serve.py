"""``udskit serve ADDR``: a server that answers every client with one action.

The socket file is claimed safely (a live server's socket is refused, a stale one
reclaimed, anything that is not a socket never touched) and removed when the server stops:
on Ctrl-C, SIGTERM, ``--until`` or ``--once``.

With ``--handover`` it takes the listener over from a ``udskit serve --handover`` already
serving the path (which finishes its clients and exits, leaving the file to us), and hands
it over in turn: to the next such command, or, on SIGHUP or ``udskit upgrade PATH``, to a
copy of itself that it starts (see :mod:`udskit.handover`).

One :class:`udskit.MessageServer` thread serves every client, calling the action per
message. What may block runs beside it: ``--print`` and a datagram's ``--exec`` command in
its one worker, a connection's ``--exec`` command with two threads of its own (see
:mod:`._exec`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import udskit
from udskit.options import DEFAULT_MAX_CLIENTS
from udskit.translate import RESOURCE_ADVICE

from . import _actions, _exec, _systemd
from ._actions import STOP, Action, Session, Until
from ._exec import Command
from ._messages import line_limit
from ._options import (
    add_drain_timeout,
    add_framing,
    add_hexdump,
    add_listening,
    add_max_frame,
    add_type,
    address,
    framing_for,
    max_frame_of,
    policy_for,
    positive_int,
)
from ._output import HexDump, Output, err
from .main import UsageError

log = logging.getLogger("udskit")

HELP = "serve ADDR: echo, uppercase, print, reply or run a command for every client"
EXAMPLE = """\
  udskit serve --echo /tmp/echo.sock
  udskit serve --type dgram --print --until DONE /tmp/s1.sock
  udskit serve --reply 'thank you!' --backlog 128 /tmp/s5.sock
  udskit serve --upper -v /tmp/upper.sock                        shows each peer's uid
  udskit serve --exec 'tr a-z A-Z' --mode 660 --group www-data /run/app/app.sock
  udskit serve --echo --handover /tmp/echo.sock     a second one takes over from the first
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
    add_max_frame(parser)
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
        "--handover",
        action="store_true",
        help=(
            "take the socket over from a 'udskit serve --handover' serving ADDR (it finishes "
            "its clients and exits; no client is refused meanwhile), or start fresh; then "
            "hand it over in turn, to the next such command, or on SIGHUP or 'udskit "
            "upgrade ADDR' to a copy of this command"
        ),
    )
    add_drain_timeout(parser, "after handing over, let clients finish")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="one line on stderr per client: pid, uid, gid, process name, address",
    )
    add_hexdump(parser)


def run(args: argparse.Namespace) -> int:
    framing = framing_for(args)
    max_frame = max_frame_of(args, framing)
    raw = args.type == "stream" and framing == "raw"
    service = _Service(args, raw=raw, lines=framing == "lines")
    allow = policy_for(args)
    # NOTIFY_SOCKET, the descriptor store
    unit = _systemd.Unit(args.address, args.type, args.mode, handover=args.handover)
    with _StopOnSignal() as stopper:
        # The handlers are in place before the socket exists: a SIGTERM sent as soon as
        # the socket answers must stop us cleanly, not kill us and leave the file behind.
        server = udskit.MessageServer(
            unit.listen_address,
            service.handle,
            workers=service.workers,
            max_clients=1 if args.once else args.max_clients,
            on_connect=service.connected,
            on_eof=service.ended,
            on_close=service.closed,
            type=args.type,
            framing=framing,
            max_frame=max_frame,
            mode=args.mode,
            owner=args.owner,
            group=args.group,
            allow=allow,
            backlog=args.backlog,
            handover=args.handover,
            drain_timeout=args.drain_timeout,
        )
        upgrader = server.listener.upgrader
        if upgrader is not None:  # before anyone can ask it for an upgrade
            _offer_upgrades(upgrader, stopper, verbose=args.verbose)
        try:
            with server, unit.serving(server):
                service.server = server
                stopper.service = service
                if args.verbose:
                    where = server.listener.address  # with the port that tcp:HOST:0 got
                    shown = f", mode {args.mode:04o}" if where.kind == "path" else ""
                    err(f"serving {where} ({args.type}{shown}); Ctrl-C stops")
                if not stopper.requested:
                    server.serve_forever()
                unit.finished = not stopper.requested  # --until, --once: done for good
        finally:
            service.finish()
    return 0


def _offer_upgrades(upgrader: udskit.Upgrader, stopper: _StopOnSignal, *, verbose: bool) -> None:
    """A successor is this very command line; SIGHUP starts it."""
    upgrader.command = [*_this_program(), *sys.argv[1:]]
    stopper.on_hangup(upgrader.upgrade)
    if verbose:
        if upgrader.previous_pid is not None:
            err(f"took {upgrader.address} over from pid {upgrader.previous_pid}")
        upgrader.on_handed_over(
            lambda: err(f"handed {upgrader.address} over to pid {upgrader.successor_pid}")
        )


def _this_program() -> list[str]:
    """How this command was started: the ``udskit`` script (so that the copy is named like
    it, in ps and udskit ls), or else the interpreter running the package."""
    script = sys.argv[0]
    if os.path.basename(script) == "udskit" and os.access(script, os.X_OK):
        return [os.path.abspath(script)]
    return [sys.executable, "-m", "udskit"]


class _StopOnSignal:
    """SIGINT and SIGTERM stop the server cleanly (its socket file removed); the previous
    handlers come back afterwards."""

    def __init__(self) -> None:
        self.service: _Service | None = None
        self.requested = False
        self._previous: dict[int, object] = {}

    def on_hangup(self, upgrade: Callable[[], None]) -> None:
        """SIGHUP calls ``upgrade`` (until the end of the ``with``)."""
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: upgrade())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.service is not None:
            self.service.stop()

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


class _Service:
    """What the MessageServer calls: ``handle`` per message; ``connected``, ``ended`` (its
    end of stream) and ``closed`` per client (stream and seqpacket). All in its serving
    thread, except ``handle`` for ``--print`` and for ``--exec`` on datagrams (see
    ``workers``)."""

    def __init__(self, args: argparse.Namespace, *, raw: bool, lines: bool) -> None:
        self.server: udskit.MessageServer | None = None
        self._raw = raw
        self._lines = lines
        self._max_line = line_limit(args.max_frame)
        self._dgram = args.type == "dgram"
        self._until_text = None if args.until is None else os.fsencode(args.until)
        self._once: bool = args.once
        self._verbose: bool = args.verbose
        self._dump = HexDump() if args.hexdump else None
        self._argv = _command(args.exec) if args.exec is not None else None
        self._action = _action(args, raw=raw)
        self._replies = not args.print  # every other action answers (--exec: its output)
        self._stopping = False
        self._commands: set[Command] = set()  # running: ended by finish() at the stop
        # Two actions may block: a datagram's command runs to its end (DGRAM_EXEC_TIMEOUT
        # at most) before the reply, and --print waits while stdout is full (a slow pipe,
        # a terminal held by Ctrl-S). They run in a worker, so that the serving thread
        # stays free to stop, and to serve (or hold back) the other clients. One worker:
        # one at a time, in the order the messages came.
        blocking = args.print or (self._dgram and self._argv is not None)
        self.workers = 1 if blocking else 0
        self._per_datagram = (
            _exec.PerDatagram(self._argv) if self._dgram and self._argv is not None else None
        )

    # -- a client ---------------------------------------------------------------------------
    def connected(self, conn: udskit.Connection) -> None:
        session = self._begin(conn)
        conn.state["session"] = session
        if self._argv is None:
            return
        assert self.server is not None
        try:
            session.command = Command(
                session,
                self._argv,
                lines=self._lines,
                max_line=self._max_line,
                call_soon=self.server.call_soon,
                where=self.server.address,
                on_done=self._command_done,
            )
        except OSError as exc:  # a command that cannot start
            advice = RESOURCE_ADVICE.get(exc.errno or 0)
            err(
                f"{session.who or 'a client'}: cannot start the --exec command: "
                f"{_one_line(exc)}{f'; {advice}' if advice else ''}"
            )
            conn.close()
            return
        self._commands.add(session.command)

    def _command_done(self, command: Command) -> None:
        self._commands.discard(command)  # in the command's thread: a set is safe for that

    def ended(self, conn: udskit.Connection) -> None:
        session: Session | None = conn.state.get("session")
        if session is not None and session.command is not None:
            session.command.end_input()  # the command reads the end of its stdin

    def closed(self, conn: udskit.Connection) -> None:
        session: Session | None = conn.state.get("session")
        if session is None:
            return
        if session.command is not None:
            session.command.client_left()
        # --once: the first client that sent or got a byte was served, however it ended
        # (one that leaves before its echo, too); one that came and went without a byte
        # either way (a readiness probe) was not.
        if (
            session.done
            or session.until.matched_at_eof()
            or (self._once and session.exchanged.is_set())
        ):
            self.stop()

    def _begin(self, conn: udskit.Connection) -> Session:
        if self._verbose:
            err(_describe(conn, replies=self._replies))
        return Session(conn, self._dump, Until(self._until_text, raw=self._raw))

    # -- a message --------------------------------------------------------------------------
    def handle(self, conn: udskit.Connection, message: bytes) -> None:
        if self._stopping:
            return  # the server stops: what arrived meanwhile is not served
        session: Session = conn.state["session"] if not self._dgram else self._begin(conn)
        if session.done:
            return  # after the client's --until message
        cut = session.until.feed(message)
        if cut is not None:
            message = message[:cut]
            session.done = True
        session.received(message)
        try:
            self._serve(session, message)
        except udskit.ConnectionClosed as exc:
            log.debug("%r: %s", conn, exc)
        except udskit.UdsError as exc:  # a reply the framing cannot carry, ...
            log.warning("%s: %s", self._address(), exc)
            self._drop(conn)
        except OSError as exc:  # an unwritable stdout, ...
            err(f"{session.who or 'a client'}: {_one_line(exc)}")
            self._drop(conn)
        if self._dgram and (session.done or (self._once and session.exchanged.is_set())):
            self.stop()

    def _serve(self, session: Session, message: bytes) -> None:
        command = session.command
        if command is not None:
            command.feed(message + b"\n" if self._lines else message)
            if session.done:
                command.end_input()  # the server stops once the command has answered
            return
        if self._dgram and self._argv is not None:
            assert self._per_datagram is not None
            self._per_datagram.run(session, message)
            return
        assert self._action is not None
        reply = self._action(message)
        if reply is STOP:
            self.stop()
        elif isinstance(reply, bytes):
            session.send(reply)  # queued: it leaves with this wake-up's other replies
            # (sent here, not returned, so that -x shows it and its errors read as before)
        if session.done:
            self.stop()

    def _drop(self, conn: udskit.Connection) -> None:
        if self._dgram:
            return  # a datagram has no connection to close
        if self.workers:
            assert self.server is not None
            self.server.call_soon(conn.abort)  # abort() is for the serving thread
        else:
            conn.abort()

    # -- the server -------------------------------------------------------------------------
    def _address(self) -> object:
        return self.server.address if self.server is not None else ""

    def stop(self) -> None:
        """Stop serving; safe from a signal handler. A datagram's command still running is
        ended: its datagram is not answered."""
        self._stopping = True
        if self.server is not None:
            self.server.stop()
        if self._per_datagram is not None:
            self._per_datagram.stop()

    def finish(self) -> None:
        """After serving: give the commands still running EXEC_EXIT_GRACE to end (their
        stdin is closed), then end them."""
        deadline = time.monotonic() + _exec.EXEC_EXIT_GRACE
        for command in list(self._commands):
            command.finish(deadline)
        if self._per_datagram is not None:
            self._per_datagram.finish()


def _action(args: argparse.Namespace, *, raw: bool) -> Action | None:
    if args.echo:
        return _actions.echo
    if args.upper:
        return _actions.upper
    if args.print:
        return _actions.make_print(Output(), raw=raw)
    if args.reply is not None:
        return _actions.make_reply(os.fsencode(args.reply), raw=raw)
    return None  # --exec: see _exec


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


def _describe(conn: udskit.Connection, *, replies: bool) -> str:
    """S7: the -v line, from the kernel's credentials (SO_PEERCRED / SCM_CREDENTIALS).

    A datagram from an unbound socket (socat UNIX-SENDTO, a client that never called
    bind) has no address to answer to: when the action would reply, the line says so,
    since the reply is dropped and the client waits for it in vain."""
    peer = conn.peer
    what = "datagram" if conn.type == "dgram" else "client"
    if conn.remote is not None:
        where = f" address={conn.remote}"
    elif conn.type == "dgram" and replies:
        where = (
            " (unbound sender: it cannot be answered; a client must bind an address to get replies)"
        )
    else:
        where = ""
    if peer is None:
        if conn.remote is not None:
            return f"{what} from {conn.remote}"
        return f"{what} from an unnamed peer{where}"
    return f"{what} pid={peer.pid} uid={peer.uid} gid={peer.gid} process={peer.process_name}{where}"
