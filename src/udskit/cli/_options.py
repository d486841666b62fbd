"""Options shared by several subcommands, and the parsing of their values.

Values argparse cannot check on its own (an octal mode, a user name, a framing that only
streams have) are checked here and refused with :class:`UsageError` (exit 2).
"""

from __future__ import annotations

import argparse
import grp
import pwd
import re
from typing import Final

import udskit
from udskit.options import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_MESSAGE
from udskit.proto import DEFAULT_MAX_FRAME, DEFAULT_MAX_LINE, HEADER

from .main import UsageError

__all__ = [
    "FRAMINGS",
    "TYPES",
    "add_framing",
    "add_max_frame",
    "add_type",
    "address",
    "byte_count",
    "framing_for",
    "group_id",
    "max_frame_of",
    "octal_mode",
    "positive_int",
    "seconds",
    "user_id",
]

TYPES: Final = ("stream", "dgram", "seqpacket")
FRAMINGS: Final = ("raw", "lines", "length")

#: Largest permission number --mode parses: the 12 bits of st_mode below the file type.
_MAX_MODE: Final = 0o7777

#: The bits a socket's mode may have: setuid, setgid and sticky mean nothing on a socket.
_SOCKET_MODE_BITS: Final = 0o777

#: Largest --max-frame: the most a frame's 4-byte length header can announce (a packet of
#: seqpacket or dgram is far smaller: the kernel caps it at the socket's send buffer).
_MAX_FRAME_LIMIT: Final = (1 << (8 * HEADER.size)) - 1

#: The suffixes a byte count may have, 1024-based as the library's limits are (16 MiB).
_BYTE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_BYTES: Final = re.compile(r"(\d+) ?(?:([kmg])(?:i?b)?)?", re.IGNORECASE)


def add_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type",
        choices=TYPES,
        default="stream",
        help="socket type (default: stream)",
    )


def add_framing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--framing",
        choices=FRAMINGS,
        default=None,
        help=(
            "how messages are delimited on a stream: raw (bytes as they come, like nc -U; the "
            "default), lines (one message per line) or length (4-byte big-endian length, "
            "then the message: udskit's library default)"
        ),
    )


def add_max_frame(parser: argparse.ArgumentParser, *, framings: bool = True) -> None:
    """--max-frame; ``framings``: the command takes --framing too (``pair`` does not)."""
    streams = (
        f"a frame of --framing length (default: {_size(DEFAULT_MAX_FRAME)}), a line of "
        f"--framing lines (default: {_size(DEFAULT_MAX_LINE)}), "
        if framings
        else ""
    )
    parser.add_argument(
        "--max-frame",
        metavar="BYTES",
        type=byte_count,
        help=(
            f"largest message accepted (and, on a stream, sent): {streams}a message of "
            "--type seqpacket"
            f"{' or dgram' if framings else ''} (default: {_size(DEFAULT_MAX_MESSAGE)}); "
            "BYTES may end in K, M or G (KiB, MiB, GiB). Both ends must allow the largest "
            "message"
        ),
    )


def add_drain_timeout(parser: argparse.ArgumentParser, what: str, then: str = "") -> None:
    """``--drain-timeout S``: ``what`` (connections left to finish) for at most S seconds,
    ``then`` what happens to those left."""
    parser.add_argument(
        "--drain-timeout",
        metavar="S",
        type=positive_seconds,
        default=DEFAULT_DRAIN_TIMEOUT,
        help=f"{what} for at most S seconds{then} (default: {DEFAULT_DRAIN_TIMEOUT:g})",
    )


def add_hexdump(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-x", "--hexdump", action="store_true", help="hex dump of the traffic on stderr"
    )


def framing_for(args: argparse.Namespace) -> str:
    """The framing to use: --framing on a stream (default raw); seqpacket and dgram keep
    the kernel's message boundaries, so a framing there is a mistake."""
    if args.type != "stream":
        if args.framing is not None:
            raise UsageError(
                f"--framing applies to stream sockets only; {args.type} sockets keep each "
                "message's boundaries themselves (drop --framing)"
            )
        return "raw"
    return str(args.framing or "raw")


def max_frame_of(args: argparse.Namespace, framing: str) -> int | None:
    """--max-frame (None: the library's default), where it has messages to bound: every
    type but a raw stream, whose bytes are passed on as they come, however many."""
    if args.max_frame is not None and args.type == "stream" and framing == "raw":
        framings = "--framing length or lines, or " if "framing" in vars(args) else ""
        raise UsageError(
            f"--max-frame bounds a message, and a raw stream has none: use it with {framings}"
            "--type seqpacket or dgram (or drop --max-frame)"
        )
    return args.max_frame  # type: ignore[no-any-return]


def byte_count(text: str) -> int:
    """argparse type: a number of bytes, at least 1, such as 1048576, 64K, 16M or 1GiB."""
    match = _BYTES.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of bytes such as 1048576, 64K or 16M"
        )
    value = int(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").lower()]
    if not 1 <= value <= _MAX_FRAME_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be from 1 to {_MAX_FRAME_LIMIT} bytes (4 GiB - 1, the most a "
            "length header can announce)"
        )
    return value


def _size(value: int) -> str:
    """A limit for the help: 16 MiB, 256 KiB."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} bytes"


def octal_mode(text: str) -> int:
    """argparse type: a socket's permission number written in octal, like 660, 0660 or
    0o660 (the number chmod takes)."""
    digits = text.removeprefix("0o")
    try:
        mode = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an octal permission number like 660 or 0600"
        ) from None
    if not 0 <= mode <= _MAX_MODE:
        raise argparse.ArgumentTypeError(f"{text!r} is over 7777, the largest permission number")
    if mode & ~_SOCKET_MODE_BITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} has setuid/setgid/sticky bits, which make no sense on a socket; "
            f"use {mode & _SOCKET_MODE_BITS:o}"
        )
    return mode


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds(text: str) -> float:
    """argparse type: a duration in seconds, zero or more (fractions allowed)."""
    return _duration(text, positive=False)


def positive_seconds(text: str) -> float:
    """argparse type: a duration in seconds, more than zero."""
    return _duration(text, positive=True)


def _duration(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        bound = "more than 0" if positive else ">= 0"  # not ">= 0" where 0 is refused
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds, {bound}")
    if positive and not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def user_id(text: str) -> int:
    """argparse type: a uid, from a number or a name in the passwd database."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown user {text!r}: give a user name from the passwd database or a uid"
        ) from None


def group_id(text: str) -> int:
    """argparse type: a gid, from a number or a name in the group database."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown group {text!r}: give a group name from the group database or a gid"
        ) from None


def address(text: str) -> udskit.Address:
    """argparse type: a udskit address (the rule it breaks becomes the usage error)."""
    try:
        return udskit.Address.parse(text)
    except udskit.AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_listening(parser: argparse.ArgumentParser, socket_file: str) -> None:
    """The options of a listening socket: its file's mode and owners, who may connect, and
    the backlog. ``socket_file`` names the file in the help ("the socket file")."""
    parser.add_argument(
        "--mode",
        type=octal_mode,
        default=0o600,
        help=f"permissions of {socket_file}, in octal (default: 600)",
    )
    parser.add_argument(
        "--owner", metavar="USER", type=user_id, help=f"owner of {socket_file} (name or uid)"
    )
    parser.add_argument(
        "--group", metavar="GROUP", type=group_id, help=f"group of {socket_file} (name or gid)"
    )
    parser.add_argument(
        "--allow-uid",
        metavar="USER",
        type=user_id,
        action="append",
        default=[],
        help="serve only peers running as USER (name or uid; repeatable)",
    )
    parser.add_argument(
        "--allow-gid",
        metavar="GROUP",
        type=group_id,
        action="append",
        default=[],
        help="serve only peers in GROUP (name or gid; repeatable)",
    )
    parser.add_argument(
        "--backlog",
        type=positive_int,
        default=128,
        help="connections the kernel queues before they are accepted (default: 128)",
    )


def policy_for(args: argparse.Namespace) -> udskit.Policy | None:
    """The access policy --allow-uid/--allow-gid ask for; None (everyone) without them."""
    if not args.allow_uid and not args.allow_gid:
        return None
    return udskit.Policy(uids=args.allow_uid, gids=args.allow_gid)
