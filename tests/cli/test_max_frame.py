"""--max-frame: the largest message, for the commands that cut a stream into messages
(--framing length or lines) or read packets; the limit's messages name the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import Background, one_line_error, serve, udskit

MIB = 1024 * 1024

#: A frame just over the 'length' framing's default limit (16 MiB).
OVER_DEFAULT_FRAME = 16 * MIB + 1


@pytest.mark.long
def test_a_frame_over_the_default_passes_with_max_frame_on_both_ends(
    sockdir: Path, background: list[Background]
) -> None:
    # The server said "max_frame must be raised", and no option could raise it.
    message = b"x" * OVER_DEFAULT_FRAME
    path = sockdir / "small.sock"
    server = serve(background, path, "--echo", "--framing", "length")
    sent = udskit("connect", "--framing", "length", "--max-frame", "32M", path, stdin=message)
    assert sent.out == b""
    server.stop()
    assert (
        f"peer announced a message of {OVER_DEFAULT_FRAME} bytes, over --max-frame "
        f"({16 * MIB} bytes): the peer uses another framing, or --max-frame must be raised"
    ) in server.err
    assert "max_frame" not in server.err

    path = sockdir / "large.sock"
    serve(background, path, "--echo", "--framing", "length", "--max-frame", "32M")
    echoed = udskit("connect", "--framing", "length", "--max-frame", "32M", path, stdin=message)
    assert (echoed.code, echoed.err) == (0, "")
    assert echoed.out == message + b"\n"


def test_a_packet_over_max_frame_names_the_option(sockdir: Path) -> None:
    line = one_line_error(
        udskit(
            "pair",
            "--type",
            "seqpacket",
            "--max-frame",
            "8",
            "--",
            "sh",
            "-c",
            "echo 0123456789 >&$UDSKIT_FD",
        ),
        1,
    )
    assert line == (
        "udskit pair: message from seqpacket channel was larger than --max-frame (8 bytes) "
        "and arrived truncated; raise --max-frame on this side"
    )


def test_a_line_over_the_lines_limit_passes_with_max_frame(
    sockdir: Path, background: list[Background]
) -> None:
    line = b"y" * (100 * 1024)  # over the 'lines' framing's 64 KiB
    path = sockdir / "lines.sock"
    serve(background, path, "--echo", "--framing", "lines", "--max-frame", "128K")
    refused = one_line_error(udskit("connect", "--framing", "lines", path, stdin=line + b"\n"), 1)
    assert refused == (
        "udskit connect: line of 102400 bytes is over --max-frame (65536 bytes): send it in "
        "parts, or raise --max-frame on both ends"
    )
    echoed = udskit(
        "connect", "--framing", "lines", "--max-frame", "128K", path, stdin=line + b"\n"
    )
    assert (echoed.code, echoed.err, echoed.out) == (0, "", line + b"\n")


def test_the_server_refuses_a_line_over_its_max_frame_in_its_words(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "short.sock"
    server = serve(background, path, "--echo", "--framing", "lines", "--max-frame", "10")
    udskit("connect", "--framing", "lines", path, stdin=b"0123456789abc\n")
    server.stop()
    assert (
        "peer sent a line of 13 bytes, over --max-frame (10 bytes): it must send shorter lines, "
        "or --max-frame must be raised; closing the connection"
    ) in server.err


def test_a_reply_over_max_frame_says_so_and_what_to_raise(
    sockdir: Path, background: list[Background]
) -> None:
    # It said "the reply from PATH is not in the None framing: try --framing raw or ...",
    # for a packet (no framing at all) and for a line alike.
    packets = sockdir / "packets.sock"
    serve(background, packets, "--echo", "--type", "seqpacket")
    sent = udskit(
        "send", "--type", "seqpacket", "--reply", "--max-frame", "8", packets, "0123456789"
    )
    assert one_line_error(sent, 1) == (
        f"udskit send: message from {packets} was larger than --max-frame (8 bytes) and "
        "arrived truncated; raise --max-frame on this side"
    )
    lines = sockdir / "lines.sock"
    serve(background, lines, "--reply", "0123456789", "--framing", "lines")
    sent = udskit("send", "--framing", "lines", "--reply", "--max-frame", "8", lines, "hi")
    assert one_line_error(sent, 1) == (
        f"udskit send: the reply from {lines}: peer sent a line of 10 bytes, over --max-frame "
        "(8 bytes): it must send shorter lines, or --max-frame must be raised"
    )
