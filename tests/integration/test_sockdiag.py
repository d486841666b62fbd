"""sock_diag's answer about which file a bound AF_UNIX socket created, checked against stat."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest

from udskit.sockdiag import BoundFile, bound_file


def _require(found: BoundFile | None) -> BoundFile:
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the kernel did not answer sock_diag for an AF_UNIX socket")
        pytest.skip("this kernel has no sock_diag for AF_UNIX (CONFIG_UNIX_DIAG)")
    return found


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_the_bound_file_is_the_one_at_the_path(sockdir: Path, kind: int) -> None:
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.bind(os.fspath(path))
        found = _require(bound_file(sock))
        assert found.matches(os.lstat(path))
        # After a rename the name changed, the file did not: still ours.
        moved = sockdir / "moved.sock"
        os.rename(path, moved)
        assert found.matches(os.lstat(moved))
        # Another socket file at the old name is not ours.
        with socket.socket(socket.AF_UNIX, kind) as other:
            other.bind(os.fspath(path))
            assert not found.matches(os.lstat(path))


def test_a_regular_file_is_not_the_bound_file(sockdir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(sockdir / "app.sock"))
        found = _require(bound_file(sock))
        regular = sockdir / "file"
        regular.write_bytes(b"")
        assert not found.matches(os.lstat(regular))


def test_no_file_no_answer() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
        assert bound_file(unbound) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind(b"\0udskit-test-" + secrets.token_hex(8).encode())
        assert bound_file(abstract) is None
