"""``Listener.accept()``, blocking and asyncio, reads accept(2) errors the one way
udskit.accepting says: a client lost while queued is skipped, anything else is raised.

The faults come from the listener's own descriptor scripted to fail first (ScriptedAccept).
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

import udskit
import udskit.aio

from .test_accept_backoff import REAL, ScriptedAccept

#: Bound on every wait here.
PATIENCE = 10.0


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO])
def test_blocking_accept_skips_a_client_lost_while_queued(sockdir: Path, code: int) -> None:
    # It used to raise ConnectionClosed ("accept ... failed"), where aio's accept() and
    # both servers went on to the next client.
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener:
        scripted = ScriptedAccept(listener.socket, [code, code, REAL])
        listener._sock = scripted  # the fault injection
        listener.settimeout(PATIENCE)
        with udskit.connect(path, timeout=PATIENCE) as client, listener.accept() as served:
            client.send(b"still served")
            assert served.recv() == b"still served"
        assert scripted.calls == 3


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO])
def test_aio_accept_skips_a_client_lost_while_queued(sockdir: Path, code: int) -> None:
    path = sockdir / "app.sock"

    async def main() -> bytes:
        async with await udskit.aio.listen(path) as listener:
            scripted = ScriptedAccept(listener.socket, [code, code, REAL])
            listener._inner._sock = scripted  # the fault injection
            async with await udskit.aio.connect(path, timeout=PATIENCE) as client:
                served = await asyncio.wait_for(listener.accept(), PATIENCE)
                async with served:
                    await client.send(b"still served")
                    return bytes(await served.recv())

    assert asyncio.run(main()) == b"still served"


def test_blocking_accept_raises_what_is_not_a_lost_client(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener:
        listener._sock = ScriptedAccept(listener.socket, [errno.EMFILE])
        with udskit.connect(path, timeout=PATIENCE), pytest.raises(OSError) as caught:
            listener.accept()
    assert isinstance(caught.value, udskit.UdsError)
    assert caught.value.__cause__ is not None
    assert caught.value.__cause__.errno == errno.EMFILE  # type: ignore[attr-defined]


def test_blocking_accept_with_timeout_zero_still_says_timeout(sockdir: Path) -> None:
    # EAGAIN is a "retry" for accept loops, but here it means "nothing now": not skipped.
    with udskit.listen(sockdir / "app.sock") as listener:
        listener.settimeout(0)
        with pytest.raises(udskit.Timeout):
            listener.accept()


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN])
def test_a_tcp_clients_network_error_is_skipped(code: int) -> None:
    # Linux reports a queued TCP connection's network error from accept(2); the listener
    # is fine. These used to end the accept loop (the bridge's: for good).
    with udskit.listen("tcp:127.0.0.1:0") as listener:
        scripted = ScriptedAccept(listener.socket, [code, REAL])
        listener._sock = scripted  # the fault injection
        listener.settimeout(PATIENCE)
        port = scripted.getsockname()[1]
        with (
            udskit.connect(f"tcp:127.0.0.1:{port}", timeout=PATIENCE) as client,
            listener.accept() as served,
        ):
            client.send(b"still served")
            assert served.recv() == b"still served"
        assert scripted.calls == 2
