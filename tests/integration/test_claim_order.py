"""A listener is live before its socket file appears: otherwise the next server's probe finds
a bound socket that refuses connections, takes it for a stale file and unlinks it.

The ordering is observed at the moment of publication (the link() into place), where a
racing claimant could first see the file.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import udskit
from udskit import sockfile


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_the_socket_listens_before_it_is_linked_into_place(
    sockdir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_link = os.link

    def observing_link(src: str | bytes, dst: str | bytes, **kwargs: object) -> None:
        # What a racing claimant would do at this instant: probe the socket being published.
        private_fd = kwargs["src_dir_fd"]
        assert isinstance(private_fd, int)
        found = sockfile.probe(b"/proc/self/fd/%d/%s" % (private_fd, os.fsencode(src)))
        seen.append(found.live)
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sockfile.os, "link", observing_link)
    with udskit.listen(sockdir / "s.sock", type=kind) as listener:
        assert listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert seen == [True]
