"""The udskit error tree.

``UdsError`` is the root and is never raised itself. Every leaf also subclasses the builtin
that names its condition, so code that already catches ``OSError``, ``ValueError`` or
``ConnectionError`` keeps working when it switches to udskit.

Every message is one line that says what failed, on which address, and what to do next.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AddressError",
    "AddressInUse",
    "ConnectError",
    "ConnectionClosed",
    "FrameTooLarge",
    "HandoverError",
    "PeerRejected",
    "ProtocolError",
    "SocketFileError",
    "Timeout",
    "UdsError",
]


class UdsError(Exception):
    """Root of every error udskit raises. Never raised itself."""

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling (multiprocessing sends a child's exception to its parent) rebuilds the
        # error from its message alone; carry the attributes set besides it, errno included
        # (OSError keeps errno in a slot that the default state dict leaves out).
        state = dict(vars(self))
        if isinstance(self, OSError):
            state["errno"] = self.errno
        return (type(self), self.args, state)


class _OSFlavour(UdsError, OSError):
    """Mixin base: an OSError whose ``str()`` is our one-line message.

    ``OSError(errno, strerror)`` would render as ``[Errno N] ...``; we pass the message alone
    and set ``errno`` afterwards so callers can still branch on it.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AddressError(UdsError, ValueError):
    """The address is malformed, or too long for ``sun_path``."""


class AddressInUse(_OSFlavour):
    """A live server owns the path (or the abstract name)."""

    def __init__(self, message: str, *, pid: int | None = None, uid: int | None = None) -> None:
        super().__init__(message, errno=_errno.EADDRINUSE)
        self.pid = pid
        self.uid = uid


class SocketFileError(_OSFlavour):
    """Something that is not a socket sits at the path; udskit never unlinks it."""


class HandoverError(_OSFlavour):
    """Taking a listener over from the process that serves it failed; that process goes on
    serving. The message says why (another handover running, another user, a timeout)."""


class ConnectError(UdsError, ConnectionError):
    """Connecting failed; the message spells out why (missing, refused, denied, ...)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ConnectionClosed(UdsError, ConnectionError):
    """The peer went away. ``mid_message`` tells whether it left a message half sent."""

    def __init__(self, message: str, *, mid_message: bool = False) -> None:
        super().__init__(message)
        self.errno = _errno.EPIPE if not mid_message else _errno.ECONNRESET
        self.mid_message = mid_message


class PeerRejected(UdsError, PermissionError):
    """The access policy refused the peer (or the server's uid was not the expected one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EACCES


class ProtocolError(UdsError):
    """The bytes on the wire broke the framing rules, or a message was truncated."""


class FrameTooLarge(ProtocolError):
    """A message is larger than the configured limit (or than the kernel allows)."""


class Timeout(UdsError, TimeoutError):
    """An operation did not complete within its timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.ETIMEDOUT
