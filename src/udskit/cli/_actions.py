"""What ``udskit serve`` does with each message: echo, upper, print, reply, exec; and the
``--until`` test that stops it.

Every action works on messages. What a message is depends on the socket: one datagram or
seqpacket packet, one frame (``--framing length``), one line (``--framing lines``) or, on a
raw stream, whatever bytes arrived together (for a peer typing in ``nc -U``, one line).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Final

import udskit

from ._messages import messages
from ._output import HexDump, Output, as_line, err

__all__ = ["Action", "Session", "Until", "run_command"]

#: A datagram server runs --exec commands one at a time, in its serving thread: one that
#: hangs would stop it from answering anyone, or from stopping. It is killed after this.
DGRAM_EXEC_TIMEOUT: Final = 30.0

#: How long a stream --exec command may take to exit once its output has ended, before it
#: is terminated (it has nothing more to say to the client).
EXEC_EXIT_GRACE: Final = 5.0

#: systemd's socket-activation variables (sd_listen_fds(3)). They describe descriptors
#: handed to the server, not to the commands it runs: removed from their environment, as
#: sd_listen_fds(unset_environment=1) does, so that no child takes the server's listener
#: for its own.
_ACTIVATION_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _command_environment() -> dict[str, str]:
    """The environment of an --exec command: ours, without socket activation's variables."""
    return {name: value for name, value in os.environ.items() if name not in _ACTIVATION_VARIABLES}


class Until:
    """Recognises the ``--until TEXT`` message.

    A message equals TEXT if it is TEXT, optionally followed by ``\\n`` or ``\\r\\n`` (what
    ``nc`` and ``socat`` send for a typed line). On a raw stream, where bytes arrive in
    arbitrary pieces, the test is per line: a line equal to TEXT, wherever the pieces split.
    """

    __slots__ = ("_line", "_overflow", "_raw", "_text")

    def __init__(self, text: bytes | None, *, raw: bool) -> None:
        self._text = text
        self._raw = raw
        self._line = b""
        self._overflow = False  # the current line is already longer than TEXT

    def feed(self, message: bytes) -> int | None:
        """The length of ``message`` up to and including the match, or None."""
        text = self._text
        if text is None:
            return None
        if not self._raw:
            return len(message) if _bare(message) == text else None
        start = 0
        while True:
            newline = message.find(b"\n", start)
            if newline < 0:
                self._extend(message[start:])
                return None
            self._extend(message[start:newline])
            line, overflow = self._line, self._overflow
            self._line, self._overflow = b"", False
            if not overflow and line.removesuffix(b"\r") == text:
                return newline + 1
            start = newline + 1

    def matched_at_eof(self) -> bool:
        """True if a raw stream ended with TEXT as its unterminated last line."""
        return self._raw and not self._overflow and self._line == self._text

    def _extend(self, part: bytes) -> None:
        if self._overflow or self._text is None:
            return
        self._line += part
        if len(self._line) > len(self._text) + 1:  # + 1 for a '\r'
            self._line, self._overflow = b"", True


def _bare(message: bytes) -> bytes:
    return message.removesuffix(b"\n").removesuffix(b"\r")


@dataclass(frozen=True, slots=True)
class Session:
    """One client (or one datagram) being served, and how to report on it.

    ``exchanged`` is set once a message has crossed in either direction: a client that
    connects and leaves without a byte either way (a readiness probe such as ``udskit
    wait``) was not served, and does not use up ``--once``.
    """

    channel: udskit.Channel
    who: str
    dump: HexDump | None
    exchanged: threading.Event = field(default_factory=threading.Event, compare=False)

    def received(self, message: bytes) -> None:
        """Note (and dump, with -x) a message from the client."""
        self.exchanged.set()
        if self.dump is not None:
            self.dump.received(message, self.who)

    def send(self, data: bytes) -> None:
        channel = self.channel
        if channel.type == "dgram" and channel.address is None:
            return  # the sender has no address (socat UNIX-SENDTO): no way to answer
        channel.send(data)
        self.exchanged.set()
        if self.dump is not None:
            self.dump.sent(data, self.who)


#: An action takes a session and one message; False means "stop serving".
Action = Callable[[Session, bytes], bool]


def echo(session: Session, message: bytes) -> bool:
    session.send(message)
    return True


def upper(session: Session, message: bytes) -> bool:
    session.send(message.upper())
    return True


def make_print(out: Output, *, raw: bool) -> Action:
    def show(session: Session, message: bytes) -> bool:
        if out.write(message if raw else as_line(message)):
            return True
        err("stdout was closed (nobody reads it any more): stopping")
        return False

    return show


def make_reply(text: bytes, *, raw: bool) -> Action:
    # On a raw stream the reply ends with a newline, the only delimiter a reader like
    # nc -U sees; framings and packets delimit messages themselves.
    reply = as_line(text) if raw else text

    def answer(session: Session, message: bytes) -> bool:
        session.send(reply)
        return True

    return answer


def run_command(session: Session, argv: Sequence[str], until: Until, *, lines: bool) -> bool:
    """``--exec`` on a stream or seqpacket connection: the client's messages to the
    command's stdin, its stdout back as messages. Returns False if --until matched."""
    channel = session.channel
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        close_fds=True,
        env=_command_environment(),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    matched = threading.Event()
    feeder = threading.Thread(
        target=_feed,
        args=(session, process.stdin, until, matched, lines),
        name="udskit-exec-stdin",
        daemon=True,
    )
    feeder.start()
    try:
        for chunk in _output_of(process.stdout, lines=lines):
            session.send(chunk)
        try:
            channel.shutdown_write()  # the command has said all it will: the client sees EOF
        except udskit.ConnectionClosed:
            pass
        try:
            process.wait(EXEC_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            pass
    finally:
        process.stdout.close()
        _end(process)
        try:
            channel.socket.shutdown(socket.SHUT_RD)  # wakes the feeder if it still waits
        except OSError:
            pass
        feeder.join()
    return not matched.is_set()


def _feed(
    session: Session, stdin: IO[bytes], until: Until, matched: threading.Event, lines: bool
) -> None:
    try:
        for message in session.channel:
            cut = until.feed(message)
            if cut is not None:
                message = message[:cut]
            session.received(message)
            _write_all(stdin, message + b"\n" if lines else message)
            if cut is not None:
                matched.set()
                return
        if until.matched_at_eof():
            matched.set()
    except (udskit.UdsError, BrokenPipeError, OSError):
        pass  # the client or the command went away: either way, feeding is over
    finally:
        try:
            stdin.close()
        except BrokenPipeError:
            pass


def _write_all(stdin: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stdin.write(view) or 0 :]


def _end(process: subprocess.Popen[bytes]) -> None:
    """Make sure the command is gone: SIGTERM, then SIGKILL if it ignores that."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(EXEC_EXIT_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _output_of(stdout: IO[bytes], *, lines: bool) -> Iterator[bytes]:
    """The command's output as messages: raw chunks, or lines (see :func:`messages`)."""
    return messages(
        stdout.fileno(),
        lines=lines,
        what="a line of the command's output",
        hint="serve its output with --framing raw, or have it print lines",
    )


def run_command_once(session: Session, argv: Sequence[str], message: bytes) -> None:
    """``--exec`` for one datagram: the datagram is the command's stdin, its stdout (if
    any) the reply."""
    try:
        result = subprocess.run(
            argv,
            input=message,
            stdout=subprocess.PIPE,
            timeout=DGRAM_EXEC_TIMEOUT,
            check=False,
            close_fds=True,
            env=_command_environment(),
        )
    except subprocess.TimeoutExpired:
        err(f"{argv[0]}: still running after {DGRAM_EXEC_TIMEOUT:g} s; killed it")
        return
    if result.stdout:
        session.send(result.stdout)
