"""Telling systemd how a service is doing: sd_notify(3) without libsystemd.

A ``Type=notify`` (or ``notify-reload``) service reports over the datagram socket named by
``NOTIFY_SOCKET``: ``READY=1`` once it serves, ``RELOADING=1`` and ``STOPPING=1`` around
a reload and at the stop, ``STATUS=`` for ``systemctl status``, ``MAINPID=`` when another
process takes over, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``, and ``FDSTORE=1`` to
keep a descriptor (a listener) in the service manager across a restart::

    from udskit import systemd

    notifier = systemd.Notifier()            # reads NOTIFY_SOCKET; inert when unset
    notifier.ready(status="serving /run/app.sock")
    with notifier.watchdog_thread():         # WATCHDOG=1 at half of WATCHDOG_USEC
        serve()
    notifier.stopping()

Nothing here raises into the server for a failed notification: systemd not listening
(``NOTIFY_SOCKET`` left over from another service, a socket that is gone) is one warning
naming the variable and the path, and every method returns whether the message left. What
raises is a caller's mistake: a field that the protocol cannot carry (:func:`encode`).

Messages are built by the sans-IO functions (:func:`encode`, :func:`status_text`,
:func:`fdname_for`); :class:`Notifier` only sends them. The sender's credentials are the
kernel's: systemd's socket has SO_PASSCRED set, so every datagram arrives with this
process's pid, uid and gid (as with sd_notify(), which sets none itself), and systemd
checks that pid against ``NotifyAccess=``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

from . import activation
from .address import Address, sun_path
from .ancillary import MAX_FDS_PER_MESSAGE, rights
from .errors import AddressError

__all__ = [
    "MIN_WATCHDOG_INTERVAL",
    "NOTIFY_SEND_TIMEOUT",
    "Notifier",
    "Watchdog",
    "encode",
    "fdname_for",
    "notify",
    "status_text",
    "watchdog_interval",
]

log = logging.getLogger("udskit")

#: How long one notification may wait for room in systemd's queue before it is given up
#: (with a warning). sd_notify() blocks without limit; a server must not hang on its
#: service manager, and systemd reads its notification socket in its main loop, so a wait
#: of seconds means it is stuck, not busy.
NOTIFY_SEND_TIMEOUT: Final = 5.0

#: The shortest watchdog ping interval: WATCHDOG_USEC below twice this is taken as this
#: (systemd's own floor for WatchdogSec= is one microsecond; a thread woken more often
#: than every few milliseconds costs more than the watchdog is worth).
MIN_WATCHDOG_INTERVAL: Final = 0.005

#: Most digits of a WATCHDOG_USEC value: systemd writes a 64-bit count of microseconds (20
#: digits at most). Checked before int(), which refuses over 4300 digits with a ValueError.
_USEC_DIGITS: Final = 20

#: A field name: what systemd's parser (strv_env_name_is_valid) takes, in practice
#: upper-case words such as READY or WATCHDOG_USEC.
_NAME: Final = re.compile(r"[A-Z_][A-Z0-9_]*\Z")

#: Characters that would end or garble a STATUS= line.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")

Fields = Mapping[str, "str | int"]


# -- messages (sans-IO) -------------------------------------------------------------------
def encode(fields: Fields) -> bytes:
    """The datagram for ``fields``: ``NAME=value`` lines, newline-separated, UTF-8.

    A value is one line: a newline (or NUL) in it would be read as a second field, so it is
    a ValueError, as is an empty message, a name systemd would not take, or a bool value.
    """
    if not fields:
        raise ValueError("a notification needs at least one field, e.g. READY=1")
    lines = []
    for name, value in fields.items():
        if not isinstance(name, str) or _NAME.match(name) is None:
            raise ValueError(
                f"notification field {name!r}: names are upper-case letters, digits and _"
            )
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"notification field {name}: value must be str or int, not {value!r}")
        text = str(value)
        if "\n" in text or "\0" in text:
            raise ValueError(
                f"notification field {name}: a value cannot hold a newline or NUL "
                "(the protocol separates fields with newlines); use status_text() for free text"
            )
        lines.append(f"{name}={text}")
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def status_text(text: str) -> str:
    """``text`` made fit for ``STATUS=``: one line of valid UTF-8 (systemd warns about any
    other). Control characters become ``\\xNN``; undecodable bytes of a path (surrogate
    escapes) become ``\\xNN`` too."""
    clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", clean)


def fdname_for(address: Address | str) -> str:
    """The descriptor-store name (``FDNAME=``) of a listener on ``address``.

    It is the address as written (a path made absolute), with what systemd does not take
    in a name (``:``, control and non-ASCII characters, and ``%`` itself) written ``%XX``;
    a name longer than systemd's 255 keeps its end and a hash of the whole.
    """
    parsed = Address.parse(address).absolute()
    if parsed.kind == "path":
        text = _escape(parsed.raw)
    elif parsed.kind == "abstract":
        text = "@" + _escape(parsed.raw)
    else:
        text = _escape(str(parsed).encode())
    if len(text) <= activation.FDNAME_MAX:
        return text
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()[:16]
    keep = activation.FDNAME_MAX - len(digest) - 1
    return digest + "~" + text[-keep:]


def _escape(raw: bytes) -> str:
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b not in (0x25, 0x3A) else f"%{b:02X}" for b in raw
    )


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what RELOADING=1 carries as MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process (unset, or ``WATCHDOG_PID``
    names another process). A malformed value is a warning and no watchdog."""
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid()):
        return None  # the watchdog is another process's (our parent's, say)
    if (
        not (usec_text.isascii() and usec_text.isdigit())
        or len(usec_text) > _USEC_DIGITS
        or int(usec_text) == 0
    ):
        log.warning(
            "WATCHDOG_USEC=%s is not a positive number of microseconds; not sending watchdog "
            "pings (check WatchdogSec= in the unit)",
            usec_text,
        )
        return None
    return max(int(usec_text) / 2_000_000, MIN_WATCHDOG_INTERVAL)


# -- sending ------------------------------------------------------------------------------
class Notifier:
    """A connection to systemd's notification socket (``NOTIFY_SOCKET``).

    ``Notifier()`` reads the environment; ``Notifier(path)`` names the socket (a path, or
    ``@name`` for an abstract one). Without one it is inert: ``enabled`` is False and every
    method returns False at once, so a server calls it unconditionally. Safe to share
    between threads. Close it (or use ``with``) to release its socket.
    """

    __slots__ = ("_address", "_closed", "_lock", "_shown", "_sock", "_warned")

    def __init__(self, address: str | None = None) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._sock: socket.socket | None = None
        self._warned = False
        text = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._shown = text or ""
        self._address = _notify_address(text) if text else None

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to send to (it may still not answer)."""
        return self._address is not None

    @property
    def address(self) -> Address | None:
        """Where notifications go; None when disabled."""
        return self._address

    # -- the messages ----------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is done (systemd starts what waits for this service)."""
        return self.send(_with_status({"READY": 1}, status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=``, as ``Type=notify-reload`` requires
        (systemd 253 and later); send :meth:`ready` when the reload is done."""
        return self.send(
            _with_status({"RELOADING": 1, "MONOTONIC_USEC": _monotonic_usec()}, status)
        )

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.send(_with_status({"STOPPING": 1}, status))

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status`` (see :func:`status_text`)."""
        return self.send({"STATUS": status_text(text)})

    def mainpid(self, pid: int) -> bool:
        """``MAINPID=``: process ``pid`` is now the service's main process (after a handover;
        with ``NotifyAccess=main``, send it from the current main process)."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise ValueError(f"MAINPID must be a process id, not {pid!r}")
        return self.send({"MAINPID": pid})

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive (see :meth:`watchdog_thread`)."""
        return self.send({"WATCHDOG": 1})

    def store_fd(self, fd: int, name: str) -> bool:
        """``FDSTORE=1`` with ``FDNAME=name``: systemd keeps a duplicate of ``fd`` and
        passes it back in ``LISTEN_FDS``/``LISTEN_FDNAMES`` when the service starts again
        (the unit needs ``FileDescriptorStoreMax=``). ``fd`` stays open here."""
        activation.check_fdname(name)
        return self.send({"FDSTORE": 1, "FDNAME": name}, fds=[fd])

    def remove_fd(self, name: str) -> bool:
        """``FDSTOREREMOVE=1`` with ``FDNAME=name``: systemd closes its stored copies."""
        activation.check_fdname(name)
        return self.send({"FDSTOREREMOVE": 1, "FDNAME": name})

    def send(self, fields: Fields, fds: Sequence[int] = ()) -> bool:
        """Send ``fields`` (with descriptors by SCM_RIGHTS); True if the datagram left.

        A notification systemd cannot receive is logged (a warning the first time, then at
        debug level, so a watchdog does not flood the log) and returns False.
        """
        data = encode(fields)
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise ValueError(f"at most {MAX_FDS_PER_MESSAGE} descriptors per notification")
        target = self._address
        if target is None:
            return False
        try:
            with self._lock:
                if self._closed:
                    return False  # a late watchdog ping: no socket is made again
                sock = self._socket()
                with sun_path(target) as where:
                    sock.sendmsg([data], rights(list(fds), len(fds)), socket.MSG_NOSIGNAL, where)
        except (OSError, AddressError) as exc:
            self._failed(exc, data)
            return False
        return True

    # -- the watchdog ----------------------------------------------------------------------
    @contextmanager
    def watchdog_thread(
        self,
        via: Callable[[Callable[[], object]], object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Iterator[Watchdog | None]:
        """Ping the watchdog while the block runs (None when no watchdog is asked)."""
        dog = Watchdog.start(self, via=via, environ=environ)
        try:
            yield dog
        finally:
            if dog is not None:
                dog.stop()

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release the socket; later messages are not sent (they return False)."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Notifier {self._shown or 'disabled'}>"

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            self._sock = sock
        return self._sock

    def _failed(self, exc: OSError | AddressError, data: bytes) -> None:
        what = data.split(b"\n", 1)[0].decode("utf-8", "replace")
        if isinstance(exc, TimeoutError):
            reason = f"systemd did not take it within {NOTIFY_SEND_TIMEOUT:g}s"
        elif isinstance(exc, OSError) and exc.errno in _NOT_LISTENING:
            reason = _NOT_LISTENING[exc.errno]
        elif isinstance(exc, OSError):
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
        else:
            reason = str(exc)
        if self._warned:
            log.debug("NOTIFY_SOCKET=%s: %s not sent: %s", self._shown, what, reason)
            return
        self._warned = True
        log.warning(
            "NOTIFY_SOCKET=%s: cannot notify systemd (%s not sent: %s); the service goes on "
            "without notifications",
            self._shown,
            what,
            reason,
        )


#: What a failed send says about the notification socket.
_NOT_LISTENING: Final = {
    errno.ENOENT: "no socket at that path",
    errno.ECONNREFUSED: "nothing is listening on it",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EPROTOTYPE: "it is not a datagram socket",
}


class Watchdog:
    """A thread, running from its creation, that sends ``WATCHDOG=1`` every ``interval``
    seconds (:meth:`start`: half of ``WATCHDOG_USEC``); :meth:`stop` ends it. With ``via``
    (a server's ``call_soon``) each ping is sent by whatever ``via`` runs it on, so a stuck
    server loop stops the pings and systemd restarts the service."""

    __slots__ = ("_event", "_interval", "_notifier", "_thread", "_via")

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        via: Callable[[Callable[[], object]], object] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be positive, not {interval!r}")
        self._notifier = notifier
        self._interval = interval
        self._via = via
        self._event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udskit-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls,
        notifier: Notifier,
        *,
        via: Callable[[Callable[[], object]], object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Watchdog | None:
        """A running watchdog if ``WATCHDOG_USEC`` asks one of this process, else None."""
        interval = watchdog_interval(environ)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, via)

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop pinging; returns once the thread has ended (no ping leaves after this)."""
        self._event.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        ping = self._notifier.watchdog
        while True:
            if self._via is None:
                ping()
            else:
                self._via(ping)
            if self._event.wait(self._interval):
                return


def notify(fields: Fields, fds: Sequence[int] = ()) -> bool:
    """Send one notification to ``NOTIFY_SOCKET`` (sd_notify(3) in one call); False when
    the variable is unset or systemd cannot receive it."""
    with Notifier() as notifier:
        return notifier.send(fields, fds)


def _with_status(fields: dict[str, str | int], status: str | None) -> dict[str, str | int]:
    if status is not None:
        fields["STATUS"] = status_text(status)
    return fields


def _notify_address(text: str) -> Address | None:
    """NOTIFY_SOCKET as an address: an absolute path or ``@abstract`` (sd_notify(3)); any
    other form (a relative path, ``vsock:`` of systemd 254) is a warning and no address."""
    if text.startswith(("/", "@")):
        try:
            return Address.parse(text)
        except AddressError as exc:
            log.warning("NOTIFY_SOCKET=%s: %s; not notifying systemd", text, exc)
            return None
    log.warning(
        "NOTIFY_SOCKET=%s: not an absolute path or @abstract name; not notifying systemd",
        text,
    )
    return None
