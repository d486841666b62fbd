"""Address parsing, and ``sun_path`` handling for paths of any length.

One string form is used everywhere, in the library and on the command line:

========================== =======================================================
``/abs/path``, ``./rel``   a socket file (``unix:PATH`` says the same explicitly)
``@name``, ``abstract:n``  a name in Linux's abstract namespace (no file at all)
``tcp:HOST:PORT``          TCP, for bridging (``tcp:[::1]:80`` for IPv6)
``fd:N``                   an inherited descriptor; ``fd:listen`` is systemd's first,
                           ``fd:listen:NAME`` the one LISTEN_FDNAMES names NAME
========================== =======================================================

A bare word with no scheme (``app.sock``) is a relative path, as with ``nc -U``. Paths are
kept as bytes, so names that are not UTF-8 round-trip through ``str()`` (surrogateescape).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeAlias

from . import activation
from .errors import AddressError

__all__ = ["SUN_PATH_MAX", "Address", "AddressLike", "one_line", "unexpanded_home"]

#: ``sizeof(((struct sockaddr_un *)0)->sun_path)`` on Linux (``UNIX_PATH_MAX`` in linux/un.h).
SUN_PATH_MAX = 108

#: Longest pathname we place in ``sun_path`` directly: one byte is kept for the terminating
#: NUL. Linux accepts all 108 bytes unterminated, but C peers that ``strcpy()`` the result of
#: ``getsockname()`` (and readers of /proc/net/unix) overrun or truncate such names.
MAX_DIRECT_PATH = SUN_PATH_MAX - 1

#: An abstract name is ``sun_path`` minus its leading NUL byte.
MAX_ABSTRACT_NAME = SUN_PATH_MAX - 1

#: Linux PATH_MAX, counting the terminating NUL.
PATH_MAX = 4096

#: The largest descriptor number: descriptors are C ints. A larger N in ``fd:N`` can name
#: no descriptor (and overflows every call that takes one).
FD_MAX = 2**31 - 1


Kind: TypeAlias = Literal["path", "abstract", "tcp", "fd"]
AddressLike: TypeAlias = "Address | str | bytes | os.PathLike[str] | os.PathLike[bytes]"

#: What ``Address.shown()`` escapes: control characters (C0, DEL, C1) and Unicode's line and
#: paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_SCHEME = re.compile(rb"^([A-Za-z][A-Za-z0-9+.-]*):")
_KNOWN_SCHEMES = (b"unix", b"abstract", b"tcp", b"fd")
_EXAMPLES = "give a path like /run/app.sock, @name, tcp:127.0.0.1:8080 or fd:3"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed udskit address. Build one with :meth:`parse`; ``str()`` gives it back."""

    kind: Kind
    #: The filesystem path (``kind == "path"``) or abstract name, as bytes.
    raw: bytes = b""
    host: str = ""
    port: int = 0
    fd: int = -1

    @classmethod
    def parse(cls, value: AddressLike) -> Address:
        """Parse any accepted address form; raise :class:`AddressError` naming the rule broken."""
        if isinstance(value, Address):
            return value
        if isinstance(value, os.PathLike):
            return _path(_encode(value), value)
        if isinstance(value, str):
            return _parse_bytes(_encode(value), value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _parse_bytes(bytes(value), value)
        raise AddressError(
            f"cannot use {value!r} as an address: expected str, bytes or a path; {_EXAMPLES}"
        )

    @property
    def path(self) -> str:
        """The path (or abstract name) as ``str``, undecodable bytes surrogate-escaped."""
        return os.fsdecode(self.raw)

    @property
    def is_unix(self) -> bool:
        """True for socket files and abstract names: the AF_UNIX addresses."""
        return self.kind in ("path", "abstract")

    def __str__(self) -> str:
        if self.kind == "path":
            text = self.path
            # A relative path that looks like a scheme (or an abstract name) needs the
            # explicit prefix to parse back to the same address.
            return text if _plain_path(self.raw) else "unix:" + text
        if self.kind == "abstract":
            return "@" + self.path
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"fd:{self.fd}"

    def shown(self) -> str:
        """``str()`` for a message or a log line: control characters written as escapes
        (``\\n``, ``\\x1b``). A peer chooses the name it binds; raw, a newline in it would
        break the one line an error is, or forge another."""
        return one_line(str(self))

    def absolute(self) -> Address:
        """The same address with a relative path made absolute (against the cwd, now)."""
        if self.kind != "path" or self.raw.startswith(b"/"):
            return self
        return Address("path", os.path.abspath(self.raw))

    def sockaddr(self) -> str | bytes:
        """What ``socket.bind``/``connect`` take, for addresses that fit ``sun_path``.

        Long paths need a directory descriptor: use :func:`sun_path` instead.
        """
        if self.kind == "abstract":
            return b"\0" + self.raw
        if self.kind == "path":
            if len(self.raw) > MAX_DIRECT_PATH:
                raise AddressError(_too_long(self.raw))
            return self.raw
        raise AddressError(f"{self} is not a Unix socket address; {_EXAMPLES}")


def one_line(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``):
    for what another user or a peer chose (a name it bound, a process name) shown in a
    line of ours, where a newline would break the line, or forge another."""
    return _UNSAFE.sub(_escaped, text)


def unexpanded_home(missing: bytes) -> str | None:
    """Advice for a missing directory that is a ``~`` nobody expanded, else None.

    ``~/app.sock`` reaches udskit unexpanded from Python, and from a shell within quotes:
    it names a directory ``~`` in the working directory, and "create it first (mkdir -p
    ~)" would be the wrong advice. ``missing`` is the absolute path of the first directory
    on the way that does not exist; only one whose name starts with ``~`` and that lies in
    the working directory is taken for a home directory (``~`` or ``~USER``)."""
    parent, name = os.path.split(missing)
    try:
        here = os.getcwdb()
    except OSError:  # the working directory was removed: nothing of it can be meant
        return None
    if not name.startswith(b"~") or parent != here:
        return None
    home = os.path.expanduser(name)
    if home == name:  # ~USER of no such user
        return None
    return (
        f"'{os.fsdecode(name)}' is expanded only by a shell, not within quotes nor in "
        f"Python (os.path.expanduser()): write {os.fsdecode(home)} in place of {os.fsdecode(name)}"
    )


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def _encode(value: str | os.PathLike[str] | os.PathLike[bytes]) -> bytes:
    """``os.fsencode``, with a lone surrogate (which no file name can hold) an AddressError."""
    try:
        return os.fsencode(value)
    except UnicodeEncodeError as exc:
        raise AddressError(
            f"address {value!r} holds a character that cannot be encoded as a file name "
            f"({exc.reason}); pass the path as bytes if it is not UTF-8"
        ) from None


def _plain_path(raw: bytes) -> bool:
    return raw.startswith((b"/", b"./", b"../")) or (
        _SCHEME.match(raw) is None and not raw.startswith(b"@")
    )


def _parse_bytes(data: bytes, original: object) -> Address:
    if not data:
        raise AddressError(f"empty address: {_EXAMPLES}")
    if data.startswith((b"/", b"./", b"../")):
        return _path(data, original)
    if data.startswith(b"@"):
        return _abstract(data[1:], original)
    match = _SCHEME.match(data)
    if match is None:
        return _path(data, original)
    scheme = match.group(1).lower()
    rest = data[match.end() :]
    if scheme == b"unix":
        return _path(rest, original)
    if scheme == b"abstract":
        return _abstract(rest, original)
    if scheme == b"tcp":
        return _tcp(rest, original)
    if scheme == b"fd":
        return _fd(rest, original)
    raise AddressError(
        f"unknown address scheme {scheme.decode('ascii')!r} in {original!r}: known schemes are "
        f"{', '.join(s.decode() + ':' for s in _KNOWN_SCHEMES)} (write ./{os.fsdecode(data)} "
        "for a relative path with a colon)"
    )


def _path(raw: bytes, original: object) -> Address:
    if not raw:
        raise AddressError(f"empty socket path in {original!r}: {_EXAMPLES}")
    if b"\0" in raw:
        raise AddressError(
            f"socket path {original!r} contains a NUL byte: file names cannot contain NUL"
        )
    if len(raw) >= PATH_MAX:
        raise AddressError(
            f"socket path {os.fsdecode(raw[:40])}... is {len(raw)} bytes; Linux paths are "
            f"limited to {PATH_MAX - 1} bytes (PATH_MAX)"
        )
    return Address("path", raw)


def _abstract(name: bytes, original: object) -> Address:
    if not name:
        raise AddressError(f"empty abstract name in {original!r}: write @NAME, e.g. @myapp")
    if b"\0" in name:
        raise AddressError(
            f"abstract name {original!r} contains a NUL byte: allowed by the kernel, but no "
            "other tool can type or show it; choose a name without NUL"
        )
    if len(name) > MAX_ABSTRACT_NAME:
        raise AddressError(
            f"abstract name {os.fsdecode(name[:40])}... is {len(name)} bytes; the limit is "
            f"{MAX_ABSTRACT_NAME} (sun_path is {SUN_PATH_MAX} bytes, one is the leading NUL)"
        )
    return Address("abstract", name)


def _tcp(rest: bytes, original: object) -> Address:
    try:
        text = rest.decode("utf-8")  # an international host name; socket applies IDNA
    except UnicodeDecodeError:
        raise AddressError(f"tcp address {original!r} is not valid UTF-8") from None
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets is ambiguous
    # At most 5 digits before int(): a long run of digits is no port, and int() refuses
    # over 4300 of them with a ValueError of its own.
    digits = port_text.lstrip("0") or "0"
    port_ok = (
        port_text.isascii() and port_text.isdigit() and len(digits) <= 5 and int(digits) <= 65535
    )
    if not sep or not host or not port_ok:
        raise AddressError(
            f"malformed tcp address {original!r}: write tcp:HOST:PORT with a port from 0 to "
            "65535, e.g. tcp:127.0.0.1:8080 or tcp:[::1]:8080"
        )
    try:
        # What connect() does to the name (IDNA): an empty or over-long label fails there
        # with a UnicodeError that names neither the address nor the rule.
        host.encode("idna")
        ok = "\0" not in host
    except UnicodeError:
        ok = False
    if not ok:
        raise AddressError(
            f"malformed tcp address {original!r}: {host!r} is no host name (each part "
            "between dots holds 1 to 63 characters, and no NUL); e.g. tcp:localhost:8080"
        )
    return Address("tcp", host=host, port=int(digits))


def _fd(rest: bytes, original: object) -> Address:
    if rest == b"listen" or rest.startswith(b"listen:"):
        name = rest[len(b"listen:") :] if rest != b"listen" else None
        try:
            text = None if name is None else name.decode("ascii")
        except UnicodeDecodeError:
            raise AddressError(
                f"{original!r}: systemd's descriptor names are printable ASCII"
            ) from None
        try:
            return Address("fd", fd=activation.find(text))
        except AddressError as exc:
            raise AddressError(f"cannot use {_shown(original)}: {exc}") from None
    if not rest.isdigit():
        raise AddressError(
            f"malformed fd address {original!r}: write fd:N with N a descriptor number, "
            "fd:listen for the first socket-activated descriptor, or fd:listen:NAME for the "
            "one LISTEN_FDNAMES names NAME"
        )
    digits = rest.lstrip(b"0") or b"0"
    # The length first: int() refuses over 4300 digits with a ValueError of its own.
    if len(digits) > len(str(FD_MAX)) or int(digits) > FD_MAX:
        shown = _shown(original)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        raise AddressError(
            f"fd address {shown} names no descriptor: descriptor numbers go up to {FD_MAX}"
        )
    return Address("fd", fd=int(digits))


def _shown(original: object) -> str:
    return original if isinstance(original, str) else repr(original)


def _too_long(raw: bytes) -> str:
    return (
        f"socket path {os.fsdecode(raw)} is {len(raw)} bytes; sun_path holds {MAX_DIRECT_PATH} "
        "(plus NUL): use a shorter path, or a shorter file name in that directory"
    )


@contextlib.contextmanager
def sun_path(address: Address) -> Iterator[str | bytes]:
    """Yield a ``sun_path`` that reaches ``address``, however long its path is.

    A path longer than ``sun_path`` is reached through an ``O_PATH`` descriptor of its
    directory, as ``/proc/self/fd/N/NAME``: the kernel resolves that in the caller's
    namespace exactly as it would the full path. Only the final name has to fit.
    """
    if address.kind != "path" or len(address.raw) <= MAX_DIRECT_PATH:
        yield address.sockaddr()
        return
    directory, name = os.path.split(address.raw)
    dir_fd = os.open(directory or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        via = b"/proc/self/fd/%d/%s" % (dir_fd, name)
        if len(via) > MAX_DIRECT_PATH:
            raise AddressError(
                f"socket path {address.path} is {len(address.raw)} bytes and its file name "
                f"alone is {len(name)}; sun_path holds {MAX_DIRECT_PATH} bytes, and even "
                f"through its directory ({len(via)} bytes) the name does not fit: use a file "
                f"name under {MAX_DIRECT_PATH - len(via) + len(name)} bytes"
            )
        yield via
    finally:
        os.close(dir_fd)
