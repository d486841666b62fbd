"""The access policy with a real second uid (DESIGN §4): children drop to nobody (65534)
with setuid() and connect; the server refuses or serves them by what the kernel says."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import ConnectionClosed, Listener, PeerRejected, Policy, Timeout

from .children import NOBODY, Held, Talker, needs_root, run_in_child

pytestmark = [pytest.mark.root, needs_root]

#: How long a refused child waits for the server's verdict before calling it a hang.
VERDICT_TIMEOUT = 10.0

#: A supplementary group that only the child holds.
EXTRA_GROUP = 4242


@pytest.fixture
def shared(sockdir: Path) -> Path:
    """A directory the second uid can reach and create sockets in (like /tmp)."""
    sockdir.chmod(0o755)
    directory = sockdir / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def _stream_client(path: Path, kind: str = "stream") -> Callable[[Callable[[str], None]], None]:
    """A child's job: connect, say so, send a message, and report how the server answered."""

    def run(say: Callable[[str], None]) -> None:
        with udskit.connect(path, type=kind, timeout=VERDICT_TIMEOUT) as channel:
            say("connected")
            try:
                channel.send(b"let me in")
                say("served: " + channel.recv().decode())
            except (ConnectionClosed, PeerRejected) as exc:
                say(f"refused: {type(exc).__name__}: {exc}")

    return run


def _serve_one(listener: Listener, *, reply: bytes = b"welcome") -> udskit.PeerCred | None:
    with listener.accept() as channel:
        assert channel.recv() == b"let me in"
        channel.send(reply)
        return channel.peer


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_refused_uid_sees_a_closed_connection_and_is_logged(
    shared: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared / "app.sock"
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(path, type=kind, mode=0o666, allow=Policy(uids={0})) as listener,
        Talker(_stream_client(path, kind), as_user=NOBODY) as child,
    ):
        assert isinstance(listener, Listener)
        assert child.line() == "connected"
        listener.settimeout(VERDICT_TIMEOUT)
        # Our own (allowed) connection queues behind the child's: accept() refuses the
        # child and returns ours, so the refusal has happened when it returns.
        with udskit.connect(path, type=kind) as ours:
            ours.send(b"let me in")
            assert _serve_one(listener) == udskit.PeerCred(os.getpid(), 0, 0)
            assert ours.recv() == b"welcome"
        verdict = child.line(VERDICT_TIMEOUT + 5)
        assert verdict.startswith("refused: "), verdict
        assert "served" not in verdict
        assert child.finish() == 0
    refusals = [r.getMessage() for r in caplog.records if "refused peer" in r.getMessage()]
    assert refusals == [
        f"{path}: refused peer pid={child.pid} uid={NOBODY} gid={NOBODY} (allowed: uid 0)"
    ]


@pytest.mark.parametrize(
    ("policy", "groups"),
    [
        (Policy(uids={NOBODY}), ()),
        (Policy(gids={NOBODY}), ()),
        (Policy(gids={EXTRA_GROUP}), (EXTRA_GROUP,)),
        (Policy(uids={0, NOBODY}), ()),
    ],
    ids=["uid", "primary-gid", "supplementary-gid", "one-of-several-uids"],
)
def test_allowed_peer_is_served(
    shared: Path, policy: Policy, groups: tuple[int, ...], caplog: pytest.LogCaptureFixture
) -> None:
    path = shared / "app.sock"
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(path, mode=0o666, allow=policy) as listener,
        Talker(_stream_client(path), as_user=NOBODY, groups=groups) as child,
    ):
        assert child.line() == "connected"
        listener.settimeout(VERDICT_TIMEOUT)
        peer = _serve_one(listener, reply=b"welcome nobody")
        assert peer is not None
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, NOBODY, NOBODY)
        assert peer.groups == groups
        assert child.line() == "served: welcome nobody"
    assert caplog.records == []


@pytest.mark.parametrize(
    "policy",
    [Policy(gids={NOBODY}), Policy.same_user_only(), Policy(uids={NOBODY})],
    ids=["gid", "same-user", "uid"],
)
def test_rules_applied_to_ourselves(shared: Path, policy: Policy) -> None:
    path = shared / "app.sock"
    allowed_self = policy.same_user
    with udskit.listen(path, allow=policy) as listener, udskit.connect(path) as ours:
        listener.settimeout(0.2)
        if allowed_self:
            with listener.accept() as channel:
                assert channel.peer is not None
                assert channel.peer.uid == os.geteuid()
            return
        with pytest.raises(Timeout):
            listener.accept()  # refuses ours, then finds nobody else
        with pytest.raises(ConnectionClosed):
            ours.recv()


def test_same_user_refuses_another_uid(shared: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shared / "app.sock"
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(path, mode=0o666, allow=Policy.same_user_only()) as listener,
        Talker(_stream_client(path), as_user=NOBODY) as child,
    ):
        assert child.line() == "connected"
        listener.settimeout(VERDICT_TIMEOUT)
        with udskit.connect(path) as ours:
            ours.send(b"let me in")
            _serve_one(listener)
            assert ours.recv() == b"welcome"
        assert child.line(VERDICT_TIMEOUT + 5).startswith("refused: ")
    assert f"(allowed: same user (uid {os.geteuid()}))" in caplog.text


def test_refused_datagram_is_dropped_and_logged(
    shared: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared / "dgram.sock"
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(path, type="dgram", mode=0o666, allow=Policy(uids={0})) as listener,
    ):

        def send_as_nobody() -> str:
            with udskit.connect(path, type="dgram") as channel:
                channel.send(b"from nobody")
            return "sent"

        # The child's datagram is queued before ours: recv() must skip it.
        assert run_in_child(send_as_nobody, as_user=NOBODY) == "sent"
        with udskit.connect(path, type="dgram") as ours:
            ours.send(b"from root")
            listener.settimeout(VERDICT_TIMEOUT)
            datagram = listener.recv()
            assert datagram.data == b"from root"
            assert datagram.peer.uid == 0
            assert datagram.sender is not None
            listener.send_to(datagram.sender, b"served")
            assert ours.recv() == b"served"
        listener.settimeout(0.1)
        with pytest.raises(Timeout):
            listener.recv()  # nothing else was queued: the refused one is gone
    refusals = [r.getMessage() for r in caplog.records if "refused peer" in r.getMessage()]
    assert len(refusals) == 1
    assert f"uid={NOBODY} gid={NOBODY} (allowed: uid 0)" in refusals[0]


def test_refused_datagram_with_descriptors_closes_them(
    shared: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared / "dgram.sock"
    with udskit.listen(path, type="dgram", mode=0o666, allow=Policy(uids={0})) as listener:

        def send_fds_as_nobody() -> str:
            read_end, write_end = os.pipe()
            with udskit.connect(path, type="dgram") as channel:
                channel.send_fds(b"take these", [read_end, write_end])
            return "sent"

        with caplog.at_level(logging.WARNING, logger="udskit"):
            assert run_in_child(send_fds_as_nobody, as_user=NOBODY) == "sent"
            before = set(os.listdir("/proc/self/fd"))
            with udskit.connect(path, type="dgram") as ours:
                ours.send(b"mine")
                listener.settimeout(VERDICT_TIMEOUT)
                assert listener.recv().data == b"mine"
            after = set(os.listdir("/proc/self/fd"))
        assert after <= before, "the refused datagram's descriptors were closed"
        assert "refused peer" in caplog.text


def _nobody_listens(path: Path) -> Callable[[], tuple[str, Callable[[], object]]]:
    def setup() -> tuple[str, Callable[[], object]]:
        listener = udskit.listen(path, mode=0o666)
        return "listening", listener.close

    return setup


def test_expect_uid_refuses_a_server_of_another_uid(shared: Path) -> None:
    path = shared / "app.sock"
    with Held(_nobody_listens(path), as_user=NOBODY) as server:
        assert server.report == "listening"
        with pytest.raises(PeerRejected) as caught:
            udskit.connect(path, expect_uid=0)
        message = str(caught.value)
        assert f"{path} is served by uid {NOBODY} (pid {server.pid})" in message
        assert "not the expected uid 0" in message
        with udskit.connect(path, expect_uid=NOBODY) as channel:
            assert channel.peer is not None
            assert channel.peer.uid == NOBODY
    assert server.stop() == 0
    assert not path.exists()


def test_listen_refuses_a_policy_of_the_wrong_kind(shared: Path) -> None:
    with pytest.raises(ValueError, match=r"allow must be a udskit\.Policy or None"):
        udskit.listen(shared / "app.sock", allow={0})  # type: ignore[call-overload]
    assert os.listdir(shared) == []


def test_peer_with_many_supplementary_groups(shared: Path) -> None:
    # More groups than the first SO_PEERGROUPS buffer holds: the kernel answers ERANGE and
    # the buffer must grow, or the last groups (and a rule naming them) would be lost.
    groups = tuple(range(10_000, 10_100))
    path = shared / "app.sock"
    with (
        udskit.listen(path, mode=0o666, allow=Policy(gids={groups[-1]})) as listener,
        Talker(_stream_client(path), as_user=NOBODY, groups=groups) as child,
    ):
        assert child.line() == "connected"
        listener.settimeout(VERDICT_TIMEOUT)
        peer = _serve_one(listener)
        assert peer is not None
        assert peer.groups == groups
        assert child.line() == "served: welcome"


def test_peer_with_more_groups_than_can_be_read(shared: Path) -> None:
    # Past 256 groups (CPython reads at most 1024 bytes of SO_PEERGROUPS) none are reported:
    # a rule naming a supplementary group refuses such a peer, the primary gid still works.
    groups = tuple(range(20_000, 20_300))
    path = shared / "app.sock"
    policy = Policy(gids={NOBODY, groups[-1]})
    with (
        udskit.listen(path, mode=0o666, allow=policy) as listener,
        Talker(_stream_client(path), as_user=NOBODY, groups=groups) as child,
    ):
        assert child.line() == "connected"
        listener.settimeout(VERDICT_TIMEOUT)
        peer = _serve_one(listener)
        assert peer is not None
        assert peer.groups == ()
        assert peer.gid == NOBODY  # allowed by its primary group
        assert child.line() == "served: welcome"
    refused = Policy(gids={groups[-1]})
    assert not refused.allows(peer)
