"""Taking over the removal of a socket file bound by another owner (handover, systemd)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from udskit import SocketFileError
from udskit.address import Address
from udskit.sockfile import adopt, claim


def bound(path: Path) -> tuple[socket.socket, os.stat_result]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    claimed = claim(sock, Address.parse(path))
    claimed.disown()  # as the first owner does when it hands the listener over
    return sock, os.stat(path)


def test_adopted_file_is_removed_by_the_new_owner(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, before = bound(path)
    with sock:
        adopted = adopt(sock, Address.parse(path))
        assert adopted.still_ours()
        adopted.release()
    assert not path.exists()
    assert before.st_ino


def test_disowned_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, before = bound(path)
    sock.close()
    after = os.stat(path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_a_file_swapped_in_is_not_adopted(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, _ = bound(path)
    with sock:
        os.rename(path, tmp_path / "moved")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(os.fspath(path))
            with pytest.raises(SocketFileError, match="another file at the path"):
                adopt(sock, Address.parse(path))
        assert path.exists()  # the other file is left alone


def test_a_missing_file_is_not_adopted(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock, _ = bound(path)
    with sock:
        path.unlink()
        with pytest.raises(SocketFileError, match="no file at the path"):
            adopt(sock, Address.parse(path))
    assert not any(name.endswith(".lock") for name in os.listdir(tmp_path))
