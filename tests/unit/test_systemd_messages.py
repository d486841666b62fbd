"""udskit.systemd's messages, without a socket: encoding, STATUS= text, FDNAME= derivation,
the watchdog interval, NOTIFY_SOCKET parsing."""

from __future__ import annotations

import logging
import os

import pytest

from udskit import systemd
from udskit.activation import FDNAME_MAX, check_fdname
from udskit.errors import AddressError


# -- encode --------------------------------------------------------------------------------
def test_fields_in_order_one_per_line() -> None:
    assert systemd.encode({"READY": 1, "STATUS": "serving /run/app.sock"}) == (
        b"READY=1\nSTATUS=serving /run/app.sock"
    )
    assert systemd.encode({"MAINPID": 4242}) == b"MAINPID=4242"
    assert systemd.encode({"STATUS": "caf\u00e9"}) == "STATUS=caf\u00e9".encode()
    assert systemd.encode({"STATUS": ""}) == b"STATUS="


@pytest.mark.parametrize(
    ("fields", "error", "rule"),
    [
        ({}, ValueError, "at least one field"),
        ({"ready": 1}, ValueError, "upper-case letters"),
        ({"READY=": 1}, ValueError, "upper-case letters"),
        ({"": 1}, ValueError, "upper-case letters"),
        ({"1X": 1}, ValueError, "upper-case letters"),
        ({"STATUS": "two\nlines"}, ValueError, "cannot hold a newline or NUL"),
        ({"STATUS": "nul\0"}, ValueError, "cannot hold a newline or NUL"),
        ({"READY": True}, TypeError, "must be str or int"),
        ({"READY": 1.0}, TypeError, "must be str or int"),
        ({"READY": b"1"}, TypeError, "must be str or int"),
    ],
)
def test_what_the_protocol_cannot_carry(
    fields: dict[str, object], error: type[Exception], rule: str
) -> None:
    with pytest.raises(error, match=rule):
        systemd.encode(fields)  # type: ignore[arg-type]


def test_status_text_is_one_line_of_utf8() -> None:
    assert systemd.status_text("ok") == "ok"
    assert systemd.status_text("a\nb\tc\x7f") == "a\\x0ab\\x09c\\x7f"
    undecodable = os.fsdecode(b"/srv/\xff.sock")  # a path that is not UTF-8
    assert systemd.status_text(undecodable) == "/srv/\\xff.sock"
    systemd.encode({"STATUS": systemd.status_text("x\ny\0")}).decode("utf-8")


# -- FDNAME= -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("/run/app.sock", "/run/app.sock"),
        ("unix:/run/app.sock", "/run/app.sock"),
        ("/run/a:b.sock", "/run/a%3Ab.sock"),
        ("/run/100%.sock", "/run/100%25.sock"),
        ("/run/caf\u00e9 bar.sock", "/run/caf%C3%A9 bar.sock"),
        (b"/run/\xff\n.sock", "/run/%FF%0A.sock"),
        ("@app", "@app"),
        ("@a:b", "@a%3Ab"),
        ("tcp:127.0.0.1:8080", "tcp%3A127.0.0.1%3A8080"),
    ],
)
def test_fdname_is_the_address_escaped(address: str | bytes, name: str) -> None:
    assert systemd.fdname_for(address) == name
    assert check_fdname(name) == name


def test_fdname_of_a_relative_path_is_absolute(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/tmp")
    assert systemd.fdname_for("app.sock") == "/tmp/app.sock"


def test_a_long_fdname_keeps_its_end_and_a_hash() -> None:
    one = systemd.fdname_for("/srv/" + "a" * 300 + "/app.sock")
    other = systemd.fdname_for("/srv/" + "b" + "a" * 299 + "/app.sock")
    assert len(one) == len(other) == FDNAME_MAX
    assert one.endswith("aaa/app.sock")
    assert one != other  # same end, different paths: the hash tells them apart
    assert check_fdname(one) == one
    assert systemd.fdname_for("/x/" + "c" * 252) == "/x/" + "c" * 252  # 255 exactly: kept


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("a:b", "holds ':'"),
        ("a\nb", "printable ASCII"),
        ("caf\u00e9", "printable ASCII"),
        ("n" * 256, "256 characters; systemd's limit is 255"),
    ],
)
def test_fdnames_systemd_refuses(name: str, rule: str) -> None:
    with pytest.raises(AddressError, match=rule):
        check_fdname(name)
    notifier = systemd.Notifier("/nonexistent/notify")
    with pytest.raises(ValueError, match=rule):
        notifier.store_fd(0, name)
    with pytest.raises(ValueError, match=rule):
        notifier.remove_fd(name)


# -- watchdog interval ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "1"}, systemd.MIN_WATCHDOG_INTERVAL),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    assert systemd.watchdog_interval(env) == interval


@pytest.mark.parametrize("value", ["0", "x", "-5", "1.5", ""])
def test_a_malformed_watchdog_usec_is_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "udskit"):
        assert systemd.watchdog_interval({"WATCHDOG_USEC": value}) is None
    [record] = caplog.records
    assert record.getMessage().startswith(f"WATCHDOG_USEC={value} is not a positive number")
    assert "WatchdogSec=" in record.getMessage()


def test_watchdog_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        systemd.Watchdog(systemd.Notifier(""), 0)


# -- NOTIFY_SOCKET -------------------------------------------------------------------------
def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier()
    assert not notifier.enabled
    assert notifier.address is None
    assert not notifier.ready(status="x")
    assert not notifier.watchdog()
    assert not systemd.notify({"READY": 1})
    with notifier.watchdog_thread(environ={"WATCHDOG_USEC": "1000"}) as dog:
        assert dog is None  # nobody to ping
    assert repr(notifier) == "<Notifier disabled>"


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:1234", "notify"])
def test_a_notify_socket_that_is_not_an_address(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "udskit"):
        notifier = systemd.Notifier(value)
    assert not notifier.enabled
    [record] = caplog.records
    assert record.getMessage() == (
        f"NOTIFY_SOCKET={value}: not an absolute path or @abstract name; not notifying systemd"
    )


def test_a_notify_socket_name_too_long(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "udskit"):
        notifier = systemd.Notifier("@" + "n" * 200)
    assert not notifier.enabled
    assert "abstract name" in caplog.text


@pytest.mark.parametrize("pid", [0, -1, True, "1"])
def test_mainpid_must_be_a_pid(pid: object) -> None:
    with pytest.raises(ValueError, match="MAINPID must be a process id"):
        systemd.Notifier("").mainpid(pid)  # type: ignore[arg-type]


def test_too_many_descriptors() -> None:
    with pytest.raises(ValueError, match="descriptors per notification"):
        systemd.Notifier("/nonexistent").send({"FDSTORE": 1}, fds=[0] * 17)
