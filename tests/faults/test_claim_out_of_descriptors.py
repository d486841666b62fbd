"""Claiming a socket path with no descriptor left, at each step that needs one: the error
is one line that names the path and says what to raise (not "check the permissions"), and
nothing is left in the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import udskit

from ..conftest import no_descriptor_left

pytestmark = pytest.mark.usefixtures("no_fd_leak")


@pytest.mark.parametrize(
    ("kind", "free"),
    [("stream", 1), ("stream", 2), ("stream", 3), ("stream", 4), ("dgram", 2), ("dgram", 3)],
)
def test_out_of_descriptors_while_claiming_says_what_to_raise(
    sockdir: Path, kind: str, free: int
) -> None:
    path = sockdir / "s"
    with no_descriptor_left(free), pytest.raises(udskit.UdsError) as caught:
        udskit.listen(path, type=kind)  # type: ignore[call-overload]
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "no descriptor left" in message, message
    assert "ulimit -n" in message
    assert "permission" not in message
    assert os.listdir(sockdir) == []


def test_a_claim_costs_no_descriptor_but_its_directorys(sockdir: Path) -> None:
    """A listener holds its socket and its directory; a datagram client too (the reply
    path's). Its file needs no descriptor of its own: the socket keeps its inode until
    the claim is released. At scale (10,000 listeners or datagram clients in a process)
    one more each would be half as many again of the open-file limit."""

    def open_now() -> int:
        return len(os.listdir("/proc/self/fd"))

    many = 20
    before = open_now()
    with udskit.listen(sockdir / "dgram", type="dgram") as server:
        listeners = [udskit.listen(sockdir / f"s{n}") for n in range(many)]
        clients = [udskit.connect(server.address, type="dgram") for _ in range(many)]
        try:
            assert open_now() - before == 2 * (1 + many + many)
        finally:
            for channel in clients:
                channel.close()
            for listener in listeners:
                listener.close()
    assert open_now() == before
    assert os.listdir(sockdir) == []
