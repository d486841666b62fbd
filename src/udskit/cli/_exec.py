"""``udskit serve --exec CMD``: the command that serves one connection, and the one that
answers one datagram.

A connection's command runs beside the server's loop, never in it. The loop hands the
client's messages to a writer thread through a queue of at most EXEC_STDIN_BACKLOG bytes
(while it is fuller, the client is not read: a command that does not read its stdin holds
up its own client only). A reader thread sends the command's output to the client
(``Connection.send`` waits while the client's outbox is full: a client that does not read
holds up its own command only). When the output ends, the connection closes once that
output has gone out; the client sees the end of the stream.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Final

import udskit
from udskit.accepting import more_open_files

from ._actions import Session
from ._messages import MAX_LINE, messages
from ._output import err

__all__ = [
    "DGRAM_EXEC_TIMEOUT",
    "EXEC_CLIENT_GONE_GRACE",
    "EXEC_EXIT_GRACE",
    "EXEC_STDIN_BACKLOG",
    "Command",
    "PerDatagram",
]

log = logging.getLogger("udskit")

#: A datagram server runs --exec commands one at a time, in its one worker thread (the
#: order of datagrams is kept; the serving thread stays free to stop). One that hangs
#: would stop it from answering anyone: it is killed after this.
DGRAM_EXEC_TIMEOUT: Final = 30.0

#: How long a connection's command may take to exit once its output has ended, before it
#: is terminated (it has nothing more to say to the client); and again after SIGTERM,
#: before SIGKILL.
EXEC_EXIT_GRACE: Final = 5.0

#: How long a connection's command may run on once its client has gone entirely, before
#: it is terminated: it has nobody to answer. socat gives 0.5 s; a second lets a command
#: finish what it was doing (a log line, a file) when its stdin ends.
EXEC_CLIENT_GONE_GRACE: Final = 1.0

#: Bytes of a client's messages queued for its command's stdin before the client is no
#: longer read (reading resumes at a quarter of it): what a command that reads slowly, or
#: never, costs the server at most, per client.
EXEC_STDIN_BACKLOG: Final = 1024 * 1024

#: systemd's socket-activation variables (sd_listen_fds(3)) and service-notification
#: variables (sd_notify(3), sd_watchdog_enabled(3)). They describe descriptors handed to
#: the server and the service the server is, not the commands it runs: removed from their
#: environment, as sd_listen_fds(unset_environment=1) and sd_notify(unset_environment=1)
#: do, so that no child takes the server's listener for its own or reports (READY=1,
#: STOPPING=1, WATCHDOG=1) for the service.
_ACTIVATION_VARIABLES: Final = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "FDSTORE",
)

#: Runs a callable in the server's loop thread (MessageServer.call_soon).
CallSoon = Callable[..., None]


def _command_environment() -> dict[str, str]:
    """The environment of an --exec command: ours, without socket activation's variables."""
    return {name: value for name, value in os.environ.items() if name not in _ACTIVATION_VARIABLES}


class Command:
    """The command serving one connection: started when the client arrives (a client that
    only listens gets the command's output too).

    ``feed``, ``end_input`` and ``client_left`` are called in the loop thread. Raises
    OSError if the command cannot start.
    """

    def __init__(
        self,
        session: Session,
        argv: Sequence[str],
        *,
        lines: bool,
        max_line: int = MAX_LINE,
        call_soon: CallSoon,
        where: object,
        on_done: Callable[[Command], object],
    ) -> None:
        self._session = session
        self._on_done = on_done  # called by the reader thread once the command is gone
        self._where = where  # the server's address, for its log
        self._lines = lines
        self._max_line = max_line
        self._call_soon = call_soon
        self._process = _start(argv, where)
        self._input: deque[bytes] = deque()
        self._queued = 0  # bytes in _input
        self._input_ended = False  # no more input: close stdin once _input is written
        self._input_broken = False  # stdin is closed: the command reads no more
        self._holding = False  # the client is not read until _input drains
        self._ready = threading.Condition()
        self._attached = True  # the connection is open: calls into its loop are wanted
        self._done = False  # the output has ended and the command is gone (under _ready)
        self._attach_lock = threading.Lock()
        # The connection stays open after the client's end of stream until the output has
        # ended: busy, as while a worker has its messages.
        session.conn.busy = True
        # ...but not after the client has gone entirely: then it closes, and the command
        # is told (client_left).
        session.conn.ends_with_client = True
        self._threads = [
            threading.Thread(target=self._write, name="udskit-exec-stdin", daemon=True),
            threading.Thread(target=self._read, name="udskit-exec-stdout", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the loop thread's side -----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue ``data`` for the command's stdin; stop reading the client if it piles up."""
        hold = False
        with self._ready:
            if self._input_ended or self._input_broken:
                return  # the command reads no more: dropped, as a pipe would drop it
            self._input.append(data)
            self._queued += len(data)
            if self._queued > EXEC_STDIN_BACKLOG and not self._holding:
                self._holding = hold = True
            self._ready.notify()
        if hold:
            self._session.conn.hold(True)

    def end_input(self) -> None:
        """The client has nothing more for the command: its stdin ends after what is queued."""
        with self._ready:
            self._input_ended = True
            self._ready.notify()

    def client_left(self) -> None:
        """The connection is closed: stdin ends; the command ends as its output does (or,
        if it still writes, at once: nobody reads it any more)."""
        with self._attach_lock:
            self._attached = False
        self.end_input()  # notifies the writer thread, which sees that once stdin is done

    def finish(self, deadline: float) -> None:
        """The server has stopped: wait for the command until ``deadline`` (monotonic),
        then end it."""
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        _end(self._process)

    # -- the threads -------------------------------------------------------------------------
    def _post(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback`` in the loop thread, unless the connection is already closed
        (then the loop may be gone too)."""
        with self._attach_lock:
            if self._attached:
                self._call_soon(callback, *args)

    def _write(self) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        fd = stdin.fileno()
        while True:
            with self._ready:
                while not self._input and not self._input_ended:
                    self._ready.wait()
                if not self._input:
                    break  # ended, and all written
                data = self._input[0]
            try:
                _write_all(fd, data)
            except OSError:  # EPIPE: the command closed its stdin or exited
                with self._ready:
                    self._input_broken = True
                    self._input.clear()
                    self._queued = 0
                    release, self._holding = self._holding, False
                if release:
                    self._post(self._session.conn.hold, False)
                break
            with self._ready:
                self._input.popleft()
                self._queued -= len(data)
                release = self._holding and self._queued <= EXEC_STDIN_BACKLOG // 4
                if release:
                    self._holding = False
            if release:
                self._post(self._session.conn.hold, False)
        try:
            stdin.close()
        except OSError:
            pass
        self._outlive_no_client()

    def _outlive_no_client(self) -> None:
        """Once the client has gone, give the command EXEC_CLIENT_GONE_GRACE, then end it:
        one that neither writes (and so never meets the closed connection) nor exits at
        the end of its stdin, such as ``tail -f`` of a quiet file, would run on for nobody
        (and, no longer counted as a client, pile up as clients come and go)."""
        with self._ready:
            while self._attached and not self._done:  # the client here, the command too
                self._ready.wait()
            if self._done:
                return
        try:
            self._process.wait(EXEC_CLIENT_GONE_GRACE)
        except subprocess.TimeoutExpired:
            log.info("%s: the client has gone; ending its command", self._where)
            _end(self._process)

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        failed = False
        ended = False
        try:
            for chunk in _output_of(stdout, lines=self._lines, limit=self._max_line):
                self._session.send(chunk)
            ended = True
        except udskit.ConnectionClosed:
            pass  # the client is gone: the command is ended below
        except udskit.UdsError as exc:  # output the framing cannot carry (a too long line)
            log.warning("%s: %s", self._where, exc)
            failed = True
        except OSError as exc:  # reading the pipe failed: as if the output had ended
            log.warning("%s: %s", self._where, exc)
        finally:
            stdout.close()
        self._post(self._output_ended, failed)
        if ended:
            try:
                self._process.wait(EXEC_EXIT_GRACE)
            except subprocess.TimeoutExpired:
                pass
        _end(self._process)
        with self._ready:
            self._done = True
            self._ready.notify_all()
        self._on_done(self)

    def _output_ended(self, failed: bool) -> None:
        """In the loop thread: the command has said all it will; close the connection once
        that has gone out (at once if it failed)."""
        conn = self._session.conn
        conn.busy = False
        if failed:
            conn.abort()
        else:
            conn.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _start(argv: Sequence[str], where: object) -> subprocess.Popen[bytes]:
    """A connection's command, its stdin and stdout piped to us. Its two pipes are two more
    open files per client than accept(2) takes: a server under a soft open-file limit runs
    out here first, and raises it as its accept would."""
    try:
        return _popen(argv)
    except OSError as exc:
        if exc.errno != errno.EMFILE or not more_open_files(where):
            raise
    return _popen(argv)


def _popen(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        close_fds=True,
        env=_command_environment(),
    )


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


def _output_of(stdout: IO[bytes], *, lines: bool, limit: int = MAX_LINE) -> Iterator[bytes]:
    """The command's output as messages: raw chunks, or lines of at most ``limit`` bytes
    (see :func:`messages`)."""
    return messages(
        stdout.fileno(),
        lines=lines,
        what="a line of the command's output",
        hint="serve its output with --framing raw, or have it print lines",
        limit=limit,
    )


class PerDatagram:
    """``--exec`` on datagrams: the command runs once per datagram, which is its stdin; its
    stdout (if any) is the reply. One at a time (``run`` is called by one worker thread)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._argv = argv
        self._running: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def run(self, session: Session, message: bytes) -> None:
        if self._stopped:
            return
        argv = self._argv
        with subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env=_command_environment(),
        ) as process:
            self._running = process
            try:
                output, _ = process.communicate(message, timeout=DGRAM_EXEC_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                err(f"{argv[0]}: still running after {DGRAM_EXEC_TIMEOUT:g} s; killed it")
                return
            finally:
                self._running = None
        if output and not self._stopped:
            session.send(output)

    def stop(self) -> None:
        """The server stops: end the command that runs now (safe from a signal handler).
        Without this, the stop would wait for it, DGRAM_EXEC_TIMEOUT at most."""
        self._stopped = True
        process = self._running
        if process is not None:
            process.terminate()

    def finish(self) -> None:
        """After serving: the command that ignored SIGTERM is killed."""
        process = self._running
        if process is not None:
            process.kill()
