"""``udskit.Address``: every accepted form, every refused one, and ``sun_path`` for long paths."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udskit import Address, AddressError
from udskit.address import MAX_ABSTRACT_NAME, MAX_DIRECT_PATH, SUN_PATH_MAX, sun_path

parse = Address.parse


# -- accepted forms --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/app.sock", Address("path", b"/run/app.sock")),
        ("./app.sock", Address("path", b"./app.sock")),
        ("../up/app.sock", Address("path", b"../up/app.sock")),
        ("app.sock", Address("path", b"app.sock")),  # a bare name is relative, as with nc -U
        ("unix:/run/app.sock", Address("path", b"/run/app.sock")),
        ("unix:rel.sock", Address("path", b"rel.sock")),
        ("UNIX:/x", Address("path", b"/x")),  # schemes are case-insensitive
        ("unix:@not-abstract", Address("path", b"@not-abstract")),
        ("unix:tcp:1", Address("path", b"tcp:1")),
        ("./weird:name", Address("path", b"./weird:name")),
        ("@app", Address("abstract", b"app")),
        ("abstract:app", Address("abstract", b"app")),
        ("@" + "n" * MAX_ABSTRACT_NAME, Address("abstract", b"n" * MAX_ABSTRACT_NAME)),
        ("tcp:127.0.0.1:8080", Address("tcp", host="127.0.0.1", port=8080)),
        ("tcp:localhost:0", Address("tcp", host="localhost", port=0)),
        ("tcp:[::1]:65535", Address("tcp", host="::1", port=65535)),
        ("tcp:[fe80::1%lo]:80", Address("tcp", host="fe80::1%lo", port=80)),
        ("tcp:bücher.example:80", Address("tcp", host="bücher.example", port=80)),
        ("fd:0", Address("fd", fd=0)),
        ("fd:3", Address("fd", fd=3)),
    ],
)
def test_parse_accepted_forms(text: str, expected: Address) -> None:
    address = parse(text)
    assert address == expected
    assert parse(text.encode()) == expected  # bytes take the same forms
    assert parse(str(address)) == address  # str() is a form parse() reads back


def test_kind_helpers() -> None:
    assert parse("/x").is_unix
    assert parse("@x").is_unix
    assert not parse("tcp:h:1").is_unix
    assert not parse("fd:3").is_unix
    assert parse(b"/x").path == "/x"


def test_str_of_each_kind() -> None:
    assert str(parse("unix:/run/a.sock")) == "/run/a.sock"
    assert str(parse("./a")) == "./a"
    assert str(parse("bare")) == "bare"
    assert str(parse("unix:@x")) == "unix:@x"  # the prefix keeps it a path
    assert str(parse("unix:fd:3")) == "unix:fd:3"
    assert str(parse("abstract:x")) == "@x"
    assert str(parse("tcp:[::1]:80")) == "tcp:[::1]:80"
    assert str(parse("tcp:10.0.0.1:80")) == "tcp:10.0.0.1:80"
    assert str(parse("fd:7")) == "fd:7"


def test_an_address_parses_to_itself() -> None:
    address = parse("@x")
    assert parse(address) is address


@pytest.mark.parametrize(
    "value",
    [Path("/run/app.sock"), PurePosixPath("/run/app.sock"), b"/run/app.sock", "/run/app.sock"],
)
def test_str_bytes_and_pathlike_are_equal(value: object) -> None:
    assert parse(value) == Address("path", b"/run/app.sock")  # type: ignore[arg-type]


def test_pathlike_is_always_a_path() -> None:
    # A PathLike is a file name by construction: no scheme is read from it.
    assert parse(Path("@name")) == Address("path", b"@name")
    assert parse(Path("tcp:h:1")) == Address("path", b"tcp:h:1")


def test_bytes_like_inputs() -> None:
    assert parse(bytearray(b"/x")) == Address("path", b"/x")
    assert parse(memoryview(b"@x")) == Address("abstract", b"x")


def test_non_utf8_bytes_round_trip() -> None:
    raw = b"/tmp/caf\xe9-\xff.sock"
    address = parse(raw)
    assert address.raw == raw  # the bytes are kept as they were
    assert parse(str(address)) == address
    assert os.fsencode(address.path) == raw
    assert parse(Path(os.fsdecode(raw))) == address
    abstract = parse(b"@\xfe\xff")
    assert abstract.raw == b"\xfe\xff"
    assert parse(str(abstract)) == abstract


def test_relative_absolute() -> None:
    assert parse("rel.sock").absolute() == Address("path", os.path.abspath(b"rel.sock"))
    assert parse("/abs").absolute() == parse("/abs")
    assert parse("@x").absolute() == parse("@x")


def test_sockaddr() -> None:
    assert parse("/x").sockaddr() == b"/x"
    assert parse("@x").sockaddr() == b"\0x"
    with pytest.raises(AddressError, match="not a Unix socket address"):
        parse("tcp:h:1").sockaddr()
    long = "/" + "d" * MAX_DIRECT_PATH
    with pytest.raises(AddressError, match=rf"{len(long)} bytes; sun_path holds {MAX_DIRECT_PATH}"):
        parse(long).sockaddr()


# -- properties ------------------------------------------------------------------------------
_name_bytes = st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" not in b)


@given(_name_bytes)
def test_any_path_round_trips(raw: bytes) -> None:
    address = Address("path", raw)
    assert parse(str(address)) == address
    assert parse(b"unix:" + raw) == address


@given(_name_bytes.filter(lambda b: len(b) <= MAX_ABSTRACT_NAME))
def test_any_abstract_name_round_trips(name: bytes) -> None:
    address = parse(b"@" + name)
    assert address == Address("abstract", name)
    assert parse(str(address)) == address


@given(
    st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)),
    st.integers(0, 65535),
)
def test_any_tcp_address_round_trips(host: str, port: int) -> None:
    address = Address("tcp", host=host, port=port)
    assert parse(str(address)) == address


@given(st.text(min_size=1, max_size=60))
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    try:
        address = parse(text)
    except AddressError:
        return
    assert parse(str(address)) == address


# -- fd:listen (systemd socket activation) ----------------------------------------------------
def test_fd_listen_with_socket_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert parse("fd:listen") == Address("fd", fd=3)  # SD_LISTEN_FDS_START


@pytest.mark.parametrize(
    ("pid", "count", "names", "rule"),
    [
        (None, None, None, r"no socket-activated descriptor: LISTEN_PID/LISTEN_FDS are not.*fd:N"),
        ("self", "0", None, r"LISTEN_FDS=0: the service manager passed no descriptor"),
        ("self", None, None, r"LISTEN_FDS= is not a number of descriptors"),
        ("self", "x", None, r"LISTEN_FDS=x is not a number of descriptors"),
        ("self", "-1", None, r"LISTEN_FDS=-1 is not a number"),
        ("self", "99999999", None, r"LISTEN_FDS=99999999 names descriptors up to 100000001,"),
        ("1", "1", None, r"LISTEN_PID=1: .*meant for process 1, not this one \(\d+\)"),
        (None, "1", None, r"LISTEN_PID= is not a process id"),
        ("0x1", "1", None, r"LISTEN_PID=0x1 is not a process id"),
        ("self", "2", "app", r"LISTEN_FDNAMES=app holds 1 name\(s\) for LISTEN_FDS=2"),
        ("self", "1", "a\tb", r"LISTEN_FDNAMES entry 'a\\tb' holds '\\t'"),
    ],
)
def test_fd_listen_without_socket_activation(
    monkeypatch: pytest.MonkeyPatch,
    pid: str | None,
    count: str | None,
    names: str | None,
    rule: str,
) -> None:
    for name, value in (("LISTEN_PID", pid), ("LISTEN_FDS", count), ("LISTEN_FDNAMES", names)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    with pytest.raises(AddressError, match=r"^cannot use fd:listen: " + rule):
        parse("fd:listen")


def test_fd_listen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_listen_fds_with_names(3): LISTEN_FDNAMES names the descriptors from 3 on; a name
    held twice (two ListenStream= lines of one unit) means the first."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "4")
    monkeypatch.setenv("LISTEN_FDNAMES", "web:admin:web:/run/app.sock")
    assert parse("fd:listen:admin") == Address("fd", fd=4)
    assert parse("fd:listen:web") == Address("fd", fd=3)
    assert parse("fd:listen:/run/app.sock") == Address("fd", fd=6)
    assert parse("fd:listen") == Address("fd", fd=3)  # the first, whatever its name
    assert parse("FD:listen:admin") == Address("fd", fd=4)  # schemes are case-blind
    with pytest.raises(
        AddressError,
        match=r"^cannot use fd:listen:api: no socket-activated descriptor is "
        r"named 'api' \(LISTEN_FDNAMES has /run/app.sock, admin, web\); set "
        r"FileDescriptorName= in the .socket unit",
    ):
        parse("fd:listen:api")


def test_fd_listen_names_default_to_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.delenv("LISTEN_FDNAMES", raising=False)
    assert parse("fd:listen:unknown") == Address("fd", fd=3)
    with pytest.raises(AddressError, match=r"LISTEN_FDNAMES is unset, so every descriptor"):
        parse("fd:listen:app")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("fd:listen:", r"^cannot use fd:listen:: write a name after the colon"),
        ("fd:listen:a:b", r"holds ':'"),
        ("fd:listen:caf\u00e9", r"printable ASCII"),
        ("fd:listen:" + "n" * 256, r"is 256 characters; systemd's limit is 255"),
        (b"fd:listen:\xff", r"printable ASCII"),
    ],
)
def test_fd_listen_bad_names(monkeypatch: pytest.MonkeyPatch, text: str | bytes, rule: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "app")
    with pytest.raises(AddressError, match=rule):
        parse(text)


# -- refused forms ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "empty address"),
        (b"", "empty address"),
        ("unix:", "empty socket path"),
        ("/run/a\0b.sock", "contains a NUL byte: file names cannot contain NUL"),
        (b"./a\0b", "contains a NUL byte"),
        (Path("/a\0b"), "contains a NUL byte"),
        ("@a\0b", "abstract name .* contains a NUL byte"),
        ("abstract:a\0b", "abstract name .* contains a NUL byte"),
        ("@", "empty abstract name"),
        ("abstract:", "empty abstract name"),
        ("@" + "n" * (MAX_ABSTRACT_NAME + 1), f"is {MAX_ABSTRACT_NAME + 1} bytes; the limit is"),
        ("/" + "p" * 4096, "Linux paths are limited to 4095 bytes"),
        ("tcp:localhost", "malformed tcp address"),  # no port
        ("tcp:localhost:", "malformed tcp address"),  # empty port
        ("tcp:localhost:70000", "port from 0 to 65535"),
        ("tcp:localhost:80x", "malformed tcp address"),
        ("tcp:localhost:-1", "malformed tcp address"),
        ("tcp:localhost:\u0663", "malformed tcp address"),  # a non-ASCII digit
        ("tcp:::1:80", "malformed tcp address"),  # IPv6 without brackets
        ("tcp:[::1:80", "malformed tcp address"),  # unclosed bracket
        ("tcp::80", "malformed tcp address"),  # empty host
        ("tcp:[]:80", "malformed tcp address"),
        (b"tcp:\xff:80", "not valid UTF-8"),
        ("http://x", "unknown address scheme 'http'"),
        ("ftp:x", "known schemes are unix:, abstract:, tcp:, fd:"),
        ("fd:abc", "malformed fd address"),
        ("fd:-1", "malformed fd address"),
        ("fd:", "malformed fd address"),
        ("/\ud800", "cannot be encoded as a file name"),  # a lone surrogate
        (1, "expected str, bytes or a path"),
        (None, "expected str, bytes or a path"),
        (3.5, "expected str, bytes or a path"),
    ],
)
def test_bad_address(value: object, rule: str) -> None:
    with pytest.raises(AddressError, match=rule) as info:
        parse(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    if value in ("", b""):
        return  # nothing to name: "empty address" is the whole story
    named = repr(value) in message or (
        isinstance(value, str) and value[1:31] in message  # long input: shown by its start
    )
    assert named, f"{message!r} does not name {value!r}"


def test_unknown_scheme_suggests_relative_path() -> None:
    with pytest.raises(AddressError, match=r"write \./ftp:x for a relative path"):
        parse("ftp:x")


# -- sun_path for long paths -----------------------------------------------------------------
def _deep_dir(base: Path, length: int) -> Path:
    """A real directory under ``base`` whose path is at least ``length`` bytes."""
    directory = base
    while len(os.fsencode(directory)) < length:
        directory = directory / ("d" * 40)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_short_path_is_used_directly(sockdir: Path) -> None:
    path = os.fsencode(sockdir / "a.sock")
    with sun_path(Address("path", path)) as where:
        assert where == path
    with sun_path(parse("@name")) as where:
        assert where == b"\0name"


def test_boundary_of_direct_paths(sockdir: Path, no_fd_leak: None) -> None:
    directory = _deep_dir(sockdir, 60)
    prefix = os.fsencode(directory) + b"/"
    fits = prefix + b"f" * (MAX_DIRECT_PATH - len(prefix))
    assert len(fits) == MAX_DIRECT_PATH
    with sun_path(Address("path", fits)) as where:
        assert where == fits
    over = fits + b"g"
    with sun_path(Address("path", over)) as where:
        assert isinstance(where, bytes)
        assert where.startswith(b"/proc/self/fd/")


def test_long_path_goes_through_directory_descriptor(sockdir: Path, no_fd_leak: None) -> None:
    directory = _deep_dir(sockdir, SUN_PATH_MAX + 50)
    path = os.fsencode(directory / "app.sock")
    assert len(path) > SUN_PATH_MAX
    with sun_path(Address("path", path)) as where:
        assert isinstance(where, bytes)
        match = re.fullmatch(rb"/proc/self/fd/(\d+)/app\.sock", where)
        assert match is not None, where
        fd = int(match.group(1))
        assert os.path.samefile(f"/proc/self/fd/{fd}", directory)  # it reaches the directory
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # closed on leaving


def test_long_path_descriptor_closed_on_error(sockdir: Path, no_fd_leak: None) -> None:
    directory = _deep_dir(sockdir, SUN_PATH_MAX + 10)
    path = Address("path", os.fsencode(directory / "app.sock"))
    with pytest.raises(RuntimeError), sun_path(path):
        raise RuntimeError("the caller's bind failed")


def test_file_name_too_long_even_through_directory(sockdir: Path, no_fd_leak: None) -> None:
    name = "n" * 100
    path = os.fsencode(sockdir / name)
    with pytest.raises(AddressError) as info, sun_path(Address("path", path)):
        pytest.fail("a name this long cannot fit sun_path")
    message = str(info.value)
    assert os.fsdecode(path) in message
    assert f"is {len(path)} bytes" in message
    assert f"sun_path holds {MAX_DIRECT_PATH} bytes" in message
    assert "\n" not in message
