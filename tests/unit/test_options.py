"""Bad options to every public entry point: refused before any socket or file exists, with a
ValueError or TypeError whose message names the option."""

from __future__ import annotations

import array
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy
import pytest

import udskit
from udskit.options import check_message, check_mode

Call = Callable[[Path, dict[str, object]], object]


def _listen(directory: Path, options: dict[str, object]) -> object:
    return udskit.listen(directory / "s.sock", **options)  # type: ignore[call-overload]


def _connect(directory: Path, options: dict[str, object]) -> object:
    return udskit.connect(directory / "s.sock", **options)  # type: ignore[arg-type]


def _pair(directory: Path, options: dict[str, object]) -> object:
    return udskit.pair(**options)  # type: ignore[arg-type]


def _server(directory: Path, options: dict[str, object]) -> object:
    handler = options.pop("handler", print)
    return udskit.Server(directory / "s.sock", handler, **options)  # type: ignore[arg-type]


def _serve(directory: Path, options: dict[str, object]) -> object:
    handler = options.pop("handler", print)
    return udskit.serve(directory / "s.sock", handler, **options)  # type: ignore[arg-type]


ENTRY_POINTS: dict[str, Call] = {
    "listen": _listen,
    "connect": _connect,
    "pair": _pair,
    "Server": _server,
    "serve": _serve,
}

EVERYWHERE = ["listen", "connect", "pair", "Server", "serve"]
SERVERS = ["listen", "Server", "serve"]

#: (entry points, the bad option, the word its message must contain)
CASES: list[tuple[list[str], dict[str, object], str]] = [
    (EVERYWHERE, {"type": "bogus"}, "type"),
    (EVERYWHERE, {"type": 1}, "type"),
    (EVERYWHERE, {"type": "raw"}, "type"),
    (EVERYWHERE, {"framing": "json"}, "framing"),
    (EVERYWHERE, {"framing": None}, "framing"),
    (EVERYWHERE, {"max_frame": 0}, "max_frame"),
    (EVERYWHERE, {"max_frame": -1}, "max_frame"),
    (EVERYWHERE, {"max_frame": "x"}, "max_frame"),
    (EVERYWHERE, {"max_frame": True}, "max_frame"),
    (EVERYWHERE, {"max_frame": 1.5}, "max_frame"),
    (EVERYWHERE, {"type": "dgram", "max_frame": 0}, "max_frame"),
    (EVERYWHERE, {"max_fds": -1}, "max_fds"),
    (EVERYWHERE, {"max_fds": 254}, "max_fds"),
    (EVERYWHERE, {"max_fds": "3"}, "max_fds"),
    (EVERYWHERE, {"sndbuf": -1}, "sndbuf"),
    (EVERYWHERE, {"rcvbuf": "big"}, "rcvbuf"),
    (EVERYWHERE, {"no_such_option": 1}, "no_such_option"),
    (SERVERS, {"backlog": 0}, "backlog"),
    (SERVERS, {"backlog": -1}, "backlog"),
    (SERVERS, {"backlog": "128"}, "backlog"),
    (SERVERS, {"mode": 0o10000}, "mode"),
    (SERVERS, {"mode": "660"}, "mode"),
    (SERVERS, {"mode": -1}, "mode"),
    (SERVERS, {"owner": "no-such-user-here"}, "owner"),
    (SERVERS, {"owner": -5}, "owner"),
    (SERVERS, {"owner": ""}, "owner"),
    (SERVERS, {"group": "no-such-group-here"}, "group"),
    (SERVERS, {"group": -5}, "group"),
    (SERVERS, {"allow": "same-user"}, "allow"),
    (SERVERS, {"allow": 1000}, "allow"),
    (SERVERS, {"type": "dgram", "allow": {1000}}, "allow"),
    (["connect"], {"timeout": -1}, "timeout"),
    (["connect"], {"timeout": math.nan}, "timeout"),
    (["connect"], {"timeout": math.inf}, "timeout"),
    (["connect"], {"timeout": "1"}, "timeout"),
    (["connect"], {"timeout": True}, "timeout"),
    (["connect"], {"bind": "tcp:127.0.0.1:1"}, "bind"),
    (["connect"], {"bind": ""}, "empty"),
    (["connect"], {"type": "dgram", "timeout": -1}, "timeout"),
    (["connect"], {"expect_uid": "root"}, "expect_uid"),
    (["Server", "serve"], {"handler": None}, "handler"),
    (["Server", "serve"], {"handler": "print"}, "handler"),
    (["Server", "serve"], {"max_clients": 0}, "max_clients"),
    (["Server", "serve"], {"max_clients": -3}, "max_clients"),
    (["Server", "serve"], {"max_clients": True}, "max_clients"),
]


@pytest.fixture
def private_tmp(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send every temporary file udskit might create (a datagram client's reply directory)
    into ``sockdir``, so that "nothing was created" can be checked there."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(sockdir))
    return sockdir


@pytest.mark.parametrize(
    ("entry", "options", "word"),
    [(entry, options, word) for entries, options, word in CASES for entry in entries],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]!r}" for k in v),
)
def test_bad_option_is_refused_before_anything_exists(
    entry: str, options: dict[str, object], word: str, private_tmp: Path, no_fd_leak: None
) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        ENTRY_POINTS[entry](private_tmp, dict(options))
    message = str(info.value)
    assert word in message, f"{entry}({options}): {message!r} does not name {word!r}"
    assert "\n" not in message
    assert not isinstance(info.value, udskit.ConnectError), "validated only after connecting"
    assert os.listdir(private_tmp) == [], "a file was created before the options were checked"


def test_good_options_are_accepted(private_tmp: Path, no_fd_leak: None) -> None:
    # The same entry points with valid values work: the refusals above are about the values.
    with udskit.listen(
        private_tmp / "s.sock",
        type="seqpacket",
        backlog=1,
        mode=0o660,
        owner=os.getuid(),
        group=str(os.getgid()),
        allow=udskit.Policy.same_user_only(),
        max_frame=1,
        max_fds=253,
        sndbuf=0,
        rcvbuf=65536,
    ) as listener:
        assert oct(os.stat(private_tmp / "s.sock").st_mode & 0o7777) == "0o660"
        with udskit.connect(
            listener.address, type="seqpacket", max_fds=0, timeout=0.0 + 5, expect_uid=os.getuid()
        ):
            pass
    left, right = udskit.pair("dgram", framing="raw", max_frame=10, max_fds=0)
    left.close()
    right.close()


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, math.inf, "5", True])
def test_settimeout_refuses_bad_values(timeout: object, no_fd_leak: None) -> None:
    left, right = udskit.pair()
    with left, right:
        with pytest.raises(ValueError, match="timeout must be None or >= 0 seconds"):
            left.settimeout(timeout)  # type: ignore[arg-type]
        left.settimeout(0.5)
        left.settimeout(None)


def test_listener_settimeout_refuses_bad_values(private_tmp: Path, no_fd_leak: None) -> None:
    with udskit.listen(private_tmp / "s.sock") as listener:
        for bad in (-1, math.nan):
            with pytest.raises(ValueError, match="timeout must be None or >= 0 seconds"):
                listener.settimeout(bad)
        listener.settimeout(0)


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (660, "mode=660 is a decimal number (0o1224 in octal"),
        (660, "did you mean 0o660?"),
        (600, "did you mean 0o600?"),
        (4755, "did you mean 0o755?"),
        (0o4755, "mode=0o4755 has setuid/setgid/sticky bits"),
        (0o1777, "make no sense on a socket; use 0o777"),
        (0o2770, "use 0o770"),
        (0o10000, "from 0 to 0o777"),
    ],
)
def test_modes_a_socket_cannot_mean_are_refused_with_a_hint(
    mode: int, words: str, private_tmp: Path, no_fd_leak: None
) -> None:
    with pytest.raises(ValueError, match="mode") as info:
        udskit.listen(private_tmp / "s.sock", mode=mode)
    assert words in str(info.value)
    assert os.listdir(private_tmp) == []


@pytest.mark.parametrize("mode", [0, 0o600, 0o660, 0o666, 0o777])
def test_socket_modes_pass_the_check(mode: int) -> None:
    assert check_mode(mode) == mode


@pytest.mark.parametrize("data", [b"x", bytearray(b"x"), memoryview(b"x"), array.array("i", [1])])
def test_check_message_accepts_bytes_like(data: object) -> None:
    check_message(data, "send")


@pytest.mark.parametrize(
    "data", [memoryview(b"abcd")[::2], numpy.arange(12, dtype="u1").reshape(3, 4).T]
)
def test_a_message_that_is_not_contiguous_is_refused_before_sending(data: object) -> None:
    ours, theirs = udskit.pair()
    with ours, theirs:
        with pytest.raises(TypeError, match=r"^send: a message is one contiguous block of "):
            ours.send(data)  # type: ignore[arg-type]
        ours.send(b"next")  # nothing went out, and the channel is whole
        assert theirs.recv() == b"next"


def test_a_released_memoryview_is_refused_before_sending() -> None:
    released = memoryview(bytearray(8))
    released.release()
    ours, theirs = udskit.pair()
    with ours, theirs:
        for send in (ours.send, lambda m: ours.send_many([m])):
            with pytest.raises(ValueError, match=r"^send\S*: this memoryview was released"):
                send(released)
        ours.send(b"next")  # nothing went out, and the channel is whole
        assert theirs.recv() == b"next"


def test_check_message_tells_to_encode_text() -> None:
    with pytest.raises(TypeError) as info:
        check_message("hello", "send_fds")
    assert str(info.value) == (
        "send_fds: messages are bytes, not str; encode text first (data.encode())"
    )


@pytest.mark.parametrize(("data", "name"), [(None, "NoneType"), (42, "int"), ([b"x"], "list")])
def test_check_message_names_what_it_got(data: object, name: str) -> None:
    with pytest.raises(TypeError, match=f"send_many: messages are bytes-like .*not {name}$"):
        check_message(data, "send_many")
