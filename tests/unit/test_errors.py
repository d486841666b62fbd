"""The error tree of DESIGN §5: one root, never raised itself; every leaf is also the
builtin that names its condition; messages are one line, without ``[Errno N]``."""

from __future__ import annotations

import ast
import errno
import pickle
from pathlib import Path

import pytest

import udskit
from udskit import (
    AddressError,
    AddressInUse,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    HandoverError,
    PeerRejected,
    ProtocolError,
    SocketFileError,
    Timeout,
    UdsError,
)

#: leaf -> the builtin (or udskit) class it must also be.
TREE: dict[type[UdsError], type[Exception]] = {
    AddressError: ValueError,
    AddressInUse: OSError,
    SocketFileError: OSError,
    HandoverError: OSError,
    ConnectError: ConnectionError,
    ConnectionClosed: ConnectionError,
    PeerRejected: PermissionError,
    ProtocolError: UdsError,
    FrameTooLarge: ProtocolError,
    Timeout: TimeoutError,
}

MESSAGE = "cannot connect to /run/app.sock: no such file; is the server running?"


def make(cls: type[UdsError]) -> UdsError:
    """An instance of ``cls`` as the library raises it."""
    if cls in (SocketFileError, ConnectError):
        return cls(MESSAGE, errno=errno.ENOENT)  # type: ignore[call-arg]
    return cls(MESSAGE)


@pytest.mark.parametrize(("leaf", "builtin"), list(TREE.items()), ids=lambda c: c.__name__)
def test_leaf_is_a_uds_error_and_its_builtin(leaf: type[UdsError], builtin: type) -> None:
    assert issubclass(leaf, UdsError)
    assert issubclass(leaf, builtin)
    with pytest.raises(builtin):  # user code's `except <builtin>` still works
        raise make(leaf)


def test_the_tree_is_complete() -> None:
    exported = {
        value
        for name in udskit.__all__
        if isinstance(value := getattr(udskit, name), type) and issubclass(value, BaseException)
    }
    assert exported == {UdsError, *TREE}


def test_oserror_family() -> None:
    # ConnectError, ConnectionClosed, PeerRejected and Timeout are OSErrors through their
    # builtins; code catching OSError around socket calls keeps catching everything.
    for leaf in (
        AddressInUse,
        SocketFileError,
        ConnectError,
        ConnectionClosed,
        Timeout,
        HandoverError,
    ):
        assert issubclass(leaf, OSError)
    assert issubclass(PeerRejected, OSError)
    assert not issubclass(AddressError, OSError)
    assert not issubclass(ProtocolError, OSError)


@pytest.mark.parametrize("leaf", list(TREE), ids=lambda c: c.__name__)
def test_str_is_the_message_alone(leaf: type[UdsError]) -> None:
    error = make(leaf)
    assert str(error) == MESSAGE
    assert "Errno" not in str(error)


@pytest.mark.parametrize("leaf", list(TREE), ids=lambda c: c.__name__)
def test_errors_survive_pickling(leaf: type[UdsError]) -> None:
    # multiprocessing pickles exceptions raised in a child back to the parent.
    error = make(leaf)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is leaf
    assert str(copy) == MESSAGE
    assert getattr(copy, "errno", None) == getattr(error, "errno", None)


def test_errno_attributes() -> None:
    assert AddressInUse("x").errno == errno.EADDRINUSE
    assert SocketFileError("x", errno=errno.ENOTSOCK).errno == errno.ENOTSOCK
    assert SocketFileError("x").errno is None
    assert ConnectError("x", errno=errno.ECONNREFUSED).errno == errno.ECONNREFUSED
    assert ConnectionClosed("x").errno == errno.EPIPE
    assert ConnectionClosed("x", mid_message=True).errno == errno.ECONNRESET
    assert PeerRejected("x").errno == errno.EACCES
    assert Timeout("x").errno == errno.ETIMEDOUT


def test_extra_attributes() -> None:
    busy = AddressInUse("in use", pid=42, uid=1000)
    assert (busy.pid, busy.uid) == (42, 1000)
    assert AddressInUse("in use").pid is None
    assert ConnectionClosed("gone").mid_message is False
    assert ConnectionClosed("cut", mid_message=True).mid_message is True
    copy = pickle.loads(pickle.dumps(busy))
    assert (copy.pid, copy.uid) == (42, 1000)
    cut = pickle.loads(pickle.dumps(ConnectionClosed("cut", mid_message=True)))
    assert cut.mid_message is True
    assert cut.errno == errno.ECONNRESET


# -- UdsError is never raised itself ----------------------------------------------------------
def raises_root(source: str) -> list[int]:
    """Line numbers where ``source`` raises UdsError itself (not a subclass)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name == "UdsError":
                lines.append(node.lineno)
    return lines


def test_no_module_raises_the_root_error() -> None:
    root = Path(udskit.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    offenders = {
        str(path.relative_to(root)): found
        for path in files
        if (found := raises_root(path.read_text(encoding="utf-8")))
    }
    assert not offenders, f"UdsError raised directly (raise a leaf instead): {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "raise UdsError('x')",
        "raise UdsError",
        "raise errors.UdsError('x') from None",
        "def f():\n    if x:\n        raise udskit.UdsError(msg) from exc",
    ],
)
def test_the_scan_finds_a_raised_root(source: str) -> None:
    assert raises_root(source)


def test_the_scan_allows_leaves_and_reraise() -> None:
    source = "try:\n    pass\nexcept UdsError:\n    raise\nraise ProtocolError('x')\n"
    assert raises_root(source) == []
