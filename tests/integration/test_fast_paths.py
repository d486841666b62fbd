"""The blocking fast paths: send_many/recv_many, spin polling, socket buffer sizes."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

import udskit
from udskit.channel import _JOIN_LIMIT, DIRECT_READ_MIN, MAX_SPIN_US
from udskit.options import DEFAULT_STREAM_BUFFER
from udskit.proto import HEADER, LengthPrefixed


def _receive_all(channel: udskit.Channel, count: int) -> list[bytes]:
    received: list[bytes] = []
    for _ in range(count):  # bounded: each call returns at least one message
        received.extend(channel.recv_many())
        if len(received) >= count:
            break
    return received


@pytest.mark.parametrize("framing", ["length", "lines"])
def test_send_many_recv_many_keep_every_message_in_order(framing: str) -> None:
    # Enough small messages to fill several batches, so the _JOIN_LIMIT split is crossed.
    messages = [f"message {i}".encode() for i in range(3 * _JOIN_LIMIT // 10)]
    left, right = udskit.pair(framing=framing)
    with left, right:
        sender = threading.Thread(target=left.send_many, args=(messages,))
        sender.start()
        received = _receive_all(right, len(messages))
        sender.join()
    assert received == messages


def test_recv_many_returns_everything_already_buffered() -> None:
    left, right = udskit.pair()
    with left, right:
        left.send_many([b"a", b"bb", b"ccc"])
        # All three frames went out in one write, so one read brings all three.
        assert right.recv_many() == [b"a", b"bb", b"ccc"]


def test_recv_many_closes_descriptors_it_does_not_return(no_fd_leak: None) -> None:
    left, right = udskit.pair()
    read_end, write_end = os.pipe()
    try:
        with left, right:
            left.send(b"first")
            left.send_fds(b"second", [read_end])
            received = _receive_all(right, 2)
            assert received == [b"first", b"second"]
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_send_many_on_message_sockets_sends_one_packet_each(kind: str) -> None:
    left, right = udskit.pair(kind)
    with left, right:
        left.send_many([b"one", b"two", b"three"])
        assert [right.recv_many() for _ in range(3)] == [[b"one"], [b"two"], [b"three"]]


def test_send_many_refuses_an_oversized_message_before_sending_it() -> None:
    left, right = udskit.pair(max_frame=16)
    with left, right:
        with pytest.raises(udskit.FrameTooLarge, match="max_frame"):
            left.send_many([b"small", b"x" * 17])
        right.settimeout(0)
        with pytest.raises(udskit.Timeout):
            right.recv()  # nothing of the failed batch was sent


def test_send_many_to_a_closed_peer_is_connection_closed() -> None:
    left, right = udskit.pair()
    right.close()
    with left, pytest.raises(udskit.ConnectionClosed):
        left.send_many([b"x"] * 10)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_spin_ping_pong_delivers_every_message(kind: str) -> None:
    rounds = 200
    left, right = udskit.pair(kind)
    left.spin = right.spin = 50
    assert left.spin == 50

    def echo() -> None:
        for _ in range(rounds):
            right.send(right.recv())

    with left, right:
        thread = threading.Thread(target=echo)
        thread.start()
        for i in range(rounds):
            left.send(b"%d" % i)
            assert left.recv() == b"%d" % i
        thread.join()


def test_spin_still_sees_end_of_stream() -> None:
    left, right = udskit.pair()
    right.spin = MAX_SPIN_US
    left.close()
    with right, pytest.raises(udskit.ConnectionClosed):
        right.recv()


@pytest.mark.parametrize("value", [-1, MAX_SPIN_US + 1, 1.5, True, "10"])
def test_spin_rejects_bad_values(value: object) -> None:
    left, right = udskit.pair()
    with left, right, pytest.raises(ValueError, match="spin must be"):
        left.spin = value  # type: ignore[assignment]


def test_spin_refuses_a_channel_with_a_timeout() -> None:
    left, right = udskit.pair()
    with left, right:
        left.settimeout(1.0)
        with pytest.raises(ValueError, match="timeout"):
            left.spin = 10


def _sndbuf(channel: udskit.Channel) -> int:
    return channel.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def test_stream_buffers_default_to_the_measured_size() -> None:
    left, right = udskit.pair()
    with left, right:
        # Linux doubles the value asked for (bookkeeping overhead), or clamps it at wmem_max.
        assert _sndbuf(left) >= min(DEFAULT_STREAM_BUFFER, _wmem_max())


def test_zero_leaves_the_kernel_default() -> None:
    default = socket.socket(socket.AF_UNIX)
    with default:
        expected = default.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    left, right = udskit.pair(sndbuf=0, rcvbuf=0)
    with left, right:
        assert _sndbuf(left) == expected


def test_listen_applies_buffer_sizes_to_every_accepted_connection(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with udskit.listen(path, sndbuf=64 * 1024) as listener:
        client = udskit.connect(path, sndbuf=128 * 1024)
        server_side = listener.accept()
        with client, server_side:
            assert _sndbuf(server_side) == 2 * 64 * 1024
            assert _sndbuf(client) == 2 * 128 * 1024


@pytest.mark.parametrize("value", [-1, 1 << 40, 1.0, True])
@pytest.mark.parametrize("option", ["sndbuf", "rcvbuf"])
def test_bad_buffer_sizes_are_refused_before_any_socket_exists(
    option: str, value: object, sockdir: Path, no_fd_leak: None
) -> None:
    with pytest.raises(ValueError, match=option):
        udskit.pair(**{option: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=option):
        udskit.listen(sockdir / "s.sock", **{option: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=option):
        udskit.connect(sockdir / "s.sock", **{option: value})  # type: ignore[arg-type]
    assert list(sockdir.iterdir()) == []


def _wmem_max() -> int:
    with open("/proc/sys/net/core/wmem_max", encoding="ascii") as f:
        return 2 * int(f.read())


# -- large messages: the direct read path ---------------------------------------------------

BIG = DIRECT_READ_MIN * 2


def _sender(channel: udskit.Channel, messages: list[bytes]) -> threading.Thread:
    thread = threading.Thread(target=lambda: [channel.send(m) for m in messages])
    thread.start()
    return thread


def test_large_and_small_messages_interleaved_arrive_intact() -> None:
    messages = [
        bytes([i]) * size
        for i, size in enumerate([BIG, BIG, 10, BIG + 1, DIRECT_READ_MIN, 0, 3, BIG, 1])
    ]
    left, right = udskit.pair()
    with left, right:
        thread = _sender(left, messages)
        received = [right.recv() for _ in messages]
        thread.join()
    assert [len(m) for m in received] == [len(m) for m in messages]
    assert received == messages


def test_peer_dying_inside_a_large_payload_is_reported_mid_message() -> None:
    left, right = udskit.pair()
    with right:
        with left:
            left.send(b"x" * BIG)  # switches the receiver to direct reads
            # a header announcing BIG bytes, then half of them, then the peer is gone
            left.socket.sendall(HEADER.pack(BIG) + b"y" * (BIG // 2))
        assert len(right.recv()) == BIG
        with pytest.raises(udskit.ConnectionClosed, match="mid-message") as info:
            right.recv()
        assert info.value.mid_message


def test_descriptors_sent_with_a_large_message_arrive_with_it(no_fd_leak: None) -> None:
    read_end, write_end = os.pipe()
    left, right = udskit.pair()
    try:
        with left, right:
            thread = threading.Thread(
                target=lambda: (left.send(b"a" * BIG), left.send_fds(b"b" * BIG, [read_end]))
            )
            thread.start()
            assert right.recv_fds() == (b"a" * BIG, [])
            data, fds = right.recv_fds()
            thread.join()
            assert data == b"b" * BIG
            assert len(fds) == 1
            os.write(write_end, b"!")
            assert os.read(fds[0], 1) == b"!"
            os.close(fds[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_large_messages_with_a_timeout_use_the_buffered_path() -> None:
    left, right = udskit.pair()
    right.settimeout(30)
    with left, right:
        thread = _sender(left, [b"p" * BIG, b"q" * BIG])
        assert right.recv() == b"p" * BIG
        assert right.recv() == b"q" * BIG
        thread.join()


def test_recv_many_keeps_whole_messages_when_the_peer_left_one_half_sent() -> None:
    frames = LengthPrefixed()
    left, right = udskit.pair()
    with right:
        with left:
            whole = frames.frame(b"a") + frames.frame(b"b")
            left.socket.sendall(whole + HEADER.pack(10) + b"12345")  # then the peer is gone
        assert _receive_all(right, 2) == [b"a", b"b"]
        with pytest.raises(udskit.ConnectionClosed, match="mid-message"):
            right.recv_many()


@pytest.mark.parametrize("framing", ["length", "lines"])
def test_recv_many_returns_the_messages_before_a_frame_over_the_limit(framing: str) -> None:
    # One read brings two whole messages and a frame over max_frame: the two are
    # returned, as recv() would return them, and the next call raises.
    raw_left, raw_right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    right = udskit.Channel(raw_right, framing=framing, max_frame=100)
    with raw_left, right:
        if framing == "length":
            frames = LengthPrefixed()
            raw_left.sendall(frames.frame(b"a") + frames.frame(b"b") + HEADER.pack(5000))
        else:
            raw_left.sendall(b"a\nb\n" + b"x" * 200)
        assert right.recv_many() == [b"a", b"b"]
        with pytest.raises(udskit.FrameTooLarge):
            right.recv_many()
