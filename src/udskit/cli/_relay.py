"""Our stdin to a channel, the channel to our stdout: the heart of ``connect`` and ``pair``.

A thread reads stdin and sends; the calling thread receives and writes stdout. The rules
are those of ``nc -U``:

* stream and seqpacket: at the end of stdin we half-close (the peer reads end of stream,
  as after ``nc -N``) and keep printing replies until the peer closes; when the peer
  closes first, we are done. ``half_close=False`` keeps our side open instead, as plain
  ``nc -U`` does, for servers that take a half-close for a client that left;
* datagram: each stdin line is one datagram. A datagram socket has no end of stream, so
  once stdin ends we listen for replies until none has come for ``linger`` seconds.

On a terminal, stdin hands over a line as soon as it is typed, so each line goes out at
once and replies are shown as they arrive.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Final

import udskit

from ._messages import MAX_LINE, messages
from ._output import HexDump, Output, as_line

__all__ = ["DGRAM_LINGER", "Relay", "stdin_messages"]

#: How long a datagram client listens for replies once its input has ended, when --timeout
#: does not say: the half second socat waits in the same situation (its -t default).
DGRAM_LINGER: Final = 0.5


def stdin_messages(fd: int, *, lines: bool, limit: int = MAX_LINE) -> Iterator[bytes]:
    """What to send, read from ``fd``: raw chunks, or lines of at most ``limit`` bytes (see
    :func:`messages`).

    A failed read says it was stdin's: the bare errno ("invalid argument") named nothing.
    """
    try:
        yield from messages(
            fd,
            lines=lines,
            what="a stdin line",
            hint="send binary data with --type stream --framing raw, or split it into lines",
            limit=limit,
        )
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(f"cannot read stdin: {reason}{_why(fd)}") from exc


def _why(fd: int) -> str:
    """What a stdin that cannot be read most likely is: a listening socket, which inetd-style
    activation passes without Accept=yes (read() on it fails with EINVAL)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return ""
    if not listening:
        return ""
    return (
        "; it is a listening socket: inetd-style activation must pass an accepted "
        "connection (Accept=yes in the .socket unit, systemd-socket-activate --inetd --accept)"
    )


class Relay:
    """Copy stdin to ``channel`` and ``channel`` to ``out`` until both directions end.

    ``lines``: stdin is cut into lines of at most ``max_line`` bytes, one message each (and
    replies are printed one per line); otherwise bytes are passed through untouched, as on a
    raw stream.
    """

    __slots__ = (
        "_channel",
        "_dump",
        "_error",
        "_half_close",
        "_input_done",
        "_lines",
        "_linger",
        "_max_line",
        "_out",
        "_wake_r",
        "_wake_w",
    )

    def __init__(
        self,
        channel: udskit.Channel,
        out: Output,
        *,
        lines: bool,
        dump: HexDump | None = None,
        linger: float = DGRAM_LINGER,
        max_line: int = MAX_LINE,
        half_close: bool = True,
    ) -> None:
        self._channel = channel
        self._half_close = half_close
        self._out = out
        self._lines = lines
        self._dump = dump
        self._linger = linger
        self._max_line = max_line
        self._error: BaseException | None = None
        self._input_done = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self, stdin_fd: int = 0) -> None:
        """Relay until done; re-raise what went wrong on the sending side, if anything."""
        sender = threading.Thread(
            target=self._send_stdin, args=(stdin_fd,), name="udskit-stdin", daemon=True
        )
        try:
            sender.start()
            if self._channel.type == "dgram":
                self._receive_datagrams()
                self._input_done.wait()
            else:
                self._receive_stream()
        finally:
            os.close(self._wake_r)
        if self._error is not None:
            raise self._error

    # -- stdin -> socket ----------------------------------------------------------------
    def _send_stdin(self, fd: int) -> None:
        channel = self._channel
        packets = channel.type != "stream"
        try:
            for message in stdin_messages(fd, lines=self._lines, limit=self._max_line):
                if packets and not message:
                    continue  # an empty seqpacket message would read as end of connection
                if self._dump is not None:
                    # Before it goes: the answer it provokes is dumped by the other thread,
                    # and must never be shown first.
                    self._dump.sent(message)
                channel.send(message)
            if channel.type != "dgram" and self._half_close:
                channel.shutdown_write()
        except udskit.ConnectionClosed as exc:
            if channel.type == "dgram":
                self._error = exc  # the server is gone: say so
            # stream, seqpacket: the receiving side sees the end and finishes
        except (udskit.UdsError, OSError) as exc:
            self._error = exc
            self._abort()
        finally:
            self._input_done.set()
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass  # the receiving side has finished already (EPIPE)
            finally:
                os.close(self._wake_w)

    def _abort(self) -> None:
        """Wake the receiving side after a sending error, so it stops and reports it."""
        try:
            self._channel.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- socket -> stdout ---------------------------------------------------------------
    def _show(self, message: bytes) -> bool:
        if self._dump is not None:
            self._dump.received(message)
        return self._out.write(as_line(message) if self._lines else message)

    def _receive_stream(self) -> None:
        try:
            for message in self._channel:
                if not self._show(message):
                    return  # nobody reads our output any more
        except udskit.ConnectionClosed:
            if self._error is None:
                raise

    def _receive_datagrams(self) -> None:
        fd = self._channel.fileno()
        poller = select.poll()  # not select(): it fails on descriptors numbered over 1023
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = {ready_fd for ready_fd, _ in poller.poll(_milliseconds(timeout))}
            if not ready:
                return  # input ended and no reply came for `linger` seconds
            if self._error is not None:
                return
            if self._wake_r in ready:
                poller.unregister(self._wake_r)  # input has ended: only replies matter now
                deadline = time.monotonic() + self._linger
            if fd in ready:
                try:
                    message = self._channel.recv()
                except udskit.ConnectionClosed:
                    return  # the server went away; a later send says so, if there is one
                if not self._show(message):
                    return
                if deadline is not None:
                    deadline = time.monotonic() + self._linger


def _milliseconds(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000) + 1  # never 0 before it is due
