"""``udskit send ADDR MSG...``: one-shot; with ``--reply``, wait for the answer and print it."""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
import struct
import termios
from typing import Final

import udskit

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

#: The ioctl that reports the bytes we sent that the peer has not read yet (Linux defines
#: SIOCOUTQ as TIOCOUTQ; Python's socket module does not export it).
_SIOCOUTQ: Final = termios.TIOCOUTQ
_INT: Final = struct.Struct("i")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", type=address, help="where to send")
    parser.add_argument("messages", metavar="MSG", nargs="+", help="the messages, in order")
    add_type(parser)
    add_framing(parser)
    add_max_frame(parser)
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
    add_hexdump(parser)


def run(args: argparse.Namespace) -> int:
    framing = framing_for(args)
    max_frame = max_frame_of(args, framing)
    raw = args.type == "stream" and framing == "raw"
    # What a reply is expected in, for the errors: only a stream has a framing to change.
    expected = framing if args.type == "stream" else None
    dump = HexDump() if args.hexdump else None
    out = Output()
    with (
        exit_on_termination(),
        udskit.connect(
            args.address,
            type=args.type,
            framing=framing,
            max_frame=max_frame,
            timeout=args.timeout,
        ) as channel,
    ):
        for text in args.messages:
            # On a raw stream a message is a line, as `echo MSG | nc -U` sends it.
            message = as_line(os.fsencode(text)) if raw else os.fsencode(text)
            try:
                channel.send(message)
            except udskit.ConnectionClosed as exc:
                raise _closed(channel, args.address, exc, expected) from exc
            if dump is not None:
                dump.sent(message)
            reply = _answer(channel, args, expected) if args.reply and not raw else None
            if reply is not None and not _show(out, dump, reply, lines=True):
                return 0  # nobody reads our output any more: main ends as SIGPIPE would
        if args.reply and raw:
            # A raw stream has no message boundaries: say we are done, print all until EOF.
            channel.shutdown_write()
            received = False
            while True:
                try:
                    chunk = _answer(channel, args, expected, answered=received)
                except udskit.ConnectionClosed:
                    if received:
                        break  # the end of the answer
                    raise
                received = True
                if not _show(out, dump, chunk, lines=False):
                    break
    return 0


def _answer(
    channel: udskit.Channel,
    args: argparse.Namespace,
    framing: str | None,
    *,
    answered: bool = False,
) -> bytes:
    """The next reply, or an error that says why none came, in the command's words."""
    where = args.address
    try:
        return channel.recv()
    except udskit.ConnectionClosed as exc:
        raise _closed(channel, where, exc, framing) from exc
    except udskit.Timeout as exc:
        if answered:
            message = f"{where} did not end its answer within {args.timeout:g} s"
        elif args.type == "dgram":
            message = (
                f"{where} did not answer within {args.timeout:g} s (a datagram server drops "
                "what its access policy refuses without a word; its log says)"
            )
        else:
            message = f"{where} did not answer within {args.timeout:g} s{_framing_hint(framing)}"
        raise udskit.Timeout(message) from exc
    except udskit.ProtocolError as exc:
        too_large = isinstance(exc, udskit.FrameTooLarge)
        if framing == "length" and args.max_frame is None and too_large:
            # A length header announcing over 16 MiB: the reply is in another framing.
            raise udskit.ProtocolError(
                f"the reply from {where} is not in the {framing} framing: {_try(framing)}"
            ) from exc
        if framing is None:
            raise  # a packet's: its words name the path, and what to do
        # Over --max-frame (a line, a frame), or what else the library found: its words
        # say what to do.
        kind = udskit.FrameTooLarge if too_large else udskit.ProtocolError
        raise kind(f"the reply from {where}: {exc}") from exc


def _closed(
    channel: udskit.Channel,
    where: udskit.Address,
    exc: udskit.ConnectionClosed,
    framing: str | None,
) -> udskit.ConnectionClosed:
    """Why the server closed the connection, from how it did: without reading our message
    (it refused the client, as an access policy does), after reading it but without a
    word, or inside a message (it does not use our framing)."""
    if exc.mid_message:
        return udskit.ConnectionClosed(
            f"the reply from {where} broke off in the middle of a message: it is not in the "
            f"{framing} framing; {_try(framing)}",
            mid_message=True,
        )
    unread = isinstance(exc.__cause__, (ConnectionResetError, BrokenPipeError))
    if unread or _unread(channel.socket):
        # After the close, a message read in part looks the same as one not read at all:
        # D-Bus reads one byte (its credentials byte) and closes on anything else.
        return udskit.ConnectionClosed(
            f"{where} closed the connection without reading all of the message: the server "
            f"refuses this client (uid {os.getuid()}), by its access policy or because the "
            "message is not in its protocol; its log says why"
        )
    return udskit.ConnectionClosed(
        f"{where} closed the connection without answering{_framing_hint(framing)}"
    )


def _unread(sock: socket.socket) -> bool:
    """True if the server closed, or shut down, its end with our message unread.

    Until the server reads them, the bytes we sent are charged to our socket's send
    buffer, which SIOCOUTQ reports. A server that closes with them unread frees them, but
    first marks our socket with ECONNRESET (net/unix/af_unix.c, unix_release_sock), which
    SO_ERROR reports: our read sees that error or a plain EOF, depending on the socket
    type and on whether it was already waiting. Asked in this order, one of the two shows
    it whenever the server never read the message; a server that read it shows neither.
    """
    try:
        queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(_INT.size))
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return False
    return bool(_INT.unpack(queued)[0] > 0 or error == errno.ECONNRESET)


def _framing_hint(framing: str | None) -> str:
    """What to try when the server may use another framing than ``framing``."""
    if framing is None:
        return ""  # seqpacket and datagrams: the kernel keeps the boundaries
    if framing == "raw":
        return (
            "; if the server expects length-prefixed messages (the udskit library's "
            "default), try --framing length"
        )
    return f"; if the server uses another framing, {_try(framing)}"


def _try(framing: str | None) -> str:
    others = " or ".join(f"--framing {f}" for f in ("raw", "lines", "length") if f != framing)
    return f"try {others}"


def _show(out: Output, dump: HexDump | None, message: bytes, *, lines: bool) -> bool:
    """Show a reply; False once nobody reads our output any more."""
    if dump is not None:
        dump.received(message)
    return out.write(as_line(message) if lines else message)
