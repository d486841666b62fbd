"""udskit.http and ``udskit http`` against servers that do not wait for the whole request:
an early 413, an echo that streams while the upload goes on, a trickle that only an overall
deadline stops, a head too large; and uploads streamed from files and pipes."""

from __future__ import annotations

import array
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import http
from udskit.http.body import BODY_CHUNK
from udskit.http.exchange import MAX_INFORMATIONAL

from ..conftest import READY_TIMEOUT
from .cli import run_udskit, udskit_command
from .httpd import (
    answer_413_early,
    cut_short,
    echo_as_it_arrives,
    first_read,
    head_of,
    informational_forever,
    read_and_summarise,
    scripted_server,
    trickle,
)

#: An upload far larger than the socket buffers on the way (1 MiB each way, see options.py):
#: a client that sends it all before reading cannot finish against these servers.
UPLOAD = 16 << 20


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"udskit").digest() * 2048  # 64 KiB, not all zeros
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def body_file(sockdir: Path) -> Path:
    path = sockdir / "upload.bin"
    path.write_bytes(_pattern(UPLOAD))
    return path


@pytest.fixture
def early(sockdir: Path) -> Iterator[udskit.Address]:
    with scripted_server(str(sockdir / "early.sock"), answer_413_early) as address:
        yield address


@pytest.fixture
def echo(sockdir: Path) -> Iterator[udskit.Address]:
    with scripted_server(str(sockdir / "echo.sock"), echo_as_it_arrives) as address:
        yield address


@pytest.fixture
def sink(sockdir: Path) -> Iterator[udskit.Address]:
    with scripted_server(str(sockdir / "sink.sock"), read_and_summarise) as address:
        yield address


def test_an_early_answer_is_returned_not_lost(early: udskit.Address) -> None:
    response = http.request(early, "/upload", method="POST", body=_pattern(UPLOAD), timeout=5)
    assert response.status == 413
    assert response.body == b"request body too large\n"
    assert response.header("connection") == "close"


def test_cli_shows_an_early_answer(early: udskit.Address, body_file: Path) -> None:
    shown = run_udskit("http", "-i", "-d", f"@{body_file}", str(early), "/upload")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(b"HTTP/1.1 413 ")
    assert shown.stdout.endswith(b"\r\n\r\nrequest body too large\n")
    assert shown.stderr == b""
    failed = run_udskit("http", "-f", "-d", f"@{body_file}", str(early), "/upload")
    assert failed.returncode == 1
    assert failed.stdout == b"request body too large\n"
    assert failed.stderr.decode() == "udskit http: POST /upload returned 413 Payload Too Large\n"


def test_a_streamed_answer_does_not_deadlock_the_upload(echo: udskit.Address) -> None:
    sent = _pattern(UPLOAD)
    with http.open_exchange(echo, "/echo", method="PUT", body=sent, timeout=5) as exchange:
        assert exchange.head.status == 200
        assert exchange.head.header("transfer-encoding") == "chunked"
        received = exchange.read()
    assert len(received) == UPLOAD
    assert received == sent


def test_cli_streams_a_file_through_an_echo(echo: udskit.Address, body_file: Path) -> None:
    shown = run_udskit("http", "--timeout", "5", "-d", f"@{body_file}", str(echo), "/echo")
    assert shown.returncode == 0, shown.stderr
    assert hashlib.sha256(shown.stdout).digest() == hashlib.sha256(_pattern(UPLOAD)).digest()


def test_max_time_stops_a_trickle(sockdir: Path) -> None:
    with scripted_server(str(sockdir / "slow.sock"), trickle) as slow:
        with pytest.raises(udskit.Timeout) as caught:
            http.request(slow, "/slow", timeout=5, max_time=0.5)
        message = str(caught.value)
        assert message.startswith(f"GET /slow on {slow} did not finish within 0.5 s (")
        assert message.endswith(" bytes of the response received)")
        shown = run_udskit("http", "--max-time", "0.5", str(slow), "/slow")
    assert shown.returncode == 1
    err = shown.stderr.decode()
    assert err.startswith(f"udskit http: GET /slow on {slow} did not finish within 0.5 s ("), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("size", [20_000, 40_000, 100_000])
def test_a_response_head_too_large_says_so(sockdir: Path, size: int) -> None:
    """Over the limit whether the head arrives in one read or in many."""
    with scripted_server(str(sockdir / "big.sock"), head_of(size)) as big:
        with pytest.raises(udskit.ProtocolError) as caught:
            http.request(big, "/")
        shown = run_udskit("http", str(big), "/")
    assert "the response head (status line and headers) is larger than 16384 bytes" in str(
        caught.value
    )
    assert "does not answer in HTTP/1.1" not in str(caught.value)
    assert shown.returncode == 1
    assert b"is larger than 16384 bytes" in shown.stderr


def test_endless_informational_responses_are_refused(sockdir: Path) -> None:
    """A server that answers 102 Processing for ever, each in time, is given up on after a
    bounded number of bytes, with no max_time needed."""
    with scripted_server(str(sockdir / "busy.sock"), informational_forever) as busy:
        with pytest.raises(udskit.ProtocolError) as caught:
            http.request(busy, "/")
        shown = run_udskit("http", str(busy), "/")
    assert str(caught.value) == (
        f"{busy} sent more than {MAX_INFORMATIONAL} bytes of informational (1xx) responses "
        "and no final one: it is not answering the request"
    )
    assert shown.returncode == 1
    assert shown.stderr.decode().count("\n") == 1
    assert b"informational (1xx) responses" in shown.stderr


def test_a_response_cut_short_says_so(sockdir: Path) -> None:
    with scripted_server(str(sockdir / "cut.sock"), cut_short) as cut:
        with (
            http.open_exchange(cut, "/") as exchange,
            pytest.raises(udskit.ConnectionClosed) as caught,
        ):
            exchange.read()
        shown = run_udskit("http", str(cut), "/")
    assert "closed the connection before the end of the response" in str(caught.value)
    assert "(received 10 bytes, expected 1000); the body is incomplete" in str(caught.value)
    assert shown.returncode == 1
    assert shown.stdout == b"0123456789"
    assert b"the body is incomplete" in shown.stderr


#: Runs ``udskit ARGS`` and prints the peak of the memory Python allocated during the request,
#: in KiB, on the last line of stderr. tracemalloc sees every bytes object, however it was
#: allocated and freed; the kernel's peak RSS does not (glibc returns memory through
#: madvise, which the high-water mark misses).
_MEASURE = """
import sys, tracemalloc
from udskit.cli.main import build_parser, main
import udskit.http
build_parser()  # imports every subcommand: not the request's memory
tracemalloc.start()
code = main(sys.argv[1:])
print(tracemalloc.get_traced_memory()[1] // 1024, file=sys.stderr)
sys.exit(code)
"""


def test_cli_streams_a_big_file_in_bounded_memory(sink: udskit.Address, sockdir: Path) -> None:
    size = 32 << 20
    path = sockdir / "big.bin"
    path.write_bytes(_pattern(size))
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, "http", "-d", f"@{path}", str(sink), "/sink"],
        capture_output=True,
        timeout=READY_TIMEOUT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["size"] == size
    assert summary["sha256"] == hashlib.sha256(_pattern(size)).hexdigest()
    assert summary["content-length"] == str(size)
    assert summary["transfer-encoding"] is None
    peak_kib = int(result.stderr.decode().splitlines()[-1])
    assert peak_kib < 4 * 1024, f"the request took {peak_kib} KiB of memory at its peak"


def test_stdin_from_a_file_is_streamed_and_from_a_pipe_read(
    sink: udskit.Address, body_file: Path
) -> None:
    with body_file.open("rb") as stdin:
        redirected = subprocess.run(
            udskit_command("http", "-d", "@-", str(sink), "/sink"),
            stdin=stdin,
            capture_output=True,
            timeout=READY_TIMEOUT * 2,
            check=False,
        )
    assert redirected.returncode == 0, redirected.stderr
    assert json.loads(redirected.stdout)["content-length"] == str(UPLOAD)
    piped = run_udskit("http", "-d", "@-", str(sink), "/sink", stdin=b"from a pipe")
    summary = json.loads(piped.stdout)
    assert (summary["size"], summary["content-length"]) == (11, "11")


def test_library_body_from_a_file_or_a_pipe(sink: udskit.Address, body_file: Path) -> None:
    with body_file.open("rb") as f:
        f.seek(1000)  # from where the file is: Content-Length is what is left
        from_file = http.request(sink, "/sink", method="PUT", body=f).json()
    assert isinstance(from_file, dict)
    assert from_file["content-length"] == str(UPLOAD - 1000)
    assert from_file["sha256"] == hashlib.sha256(_pattern(UPLOAD)[1000:]).hexdigest()

    read_end, write_end = os.pipe()
    data = _pattern(3 << 20)

    def feed() -> None:
        with os.fdopen(write_end, "wb") as out:
            out.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with os.fdopen(read_end, "rb") as pipe:
            from_pipe = http.request(sink, "/sink", method="PUT", body=pipe).json()
    finally:
        feeder.join(READY_TIMEOUT)
    assert isinstance(from_pipe, dict)
    assert (from_pipe["transfer-encoding"], from_pipe["content-length"]) == ("chunked", None)
    assert (from_pipe["size"], from_pipe["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


class _ShrinkingFile(io.FileIO):
    """A file that another process truncates to 10 bytes once the upload has started."""

    def read(self, size: int | None = -1, /) -> bytes:
        os.truncate(str(self.name), 10)
        return super().read(size)


def test_a_file_that_shrinks_while_sent_is_an_error(sink: udskit.Address, sockdir: Path) -> None:
    path = sockdir / "shrinks.bin"
    path.write_bytes(bytes(1000))
    with (
        _ShrinkingFile(path, "r") as f,
        pytest.raises(
            udskit.ProtocolError, match=r"990 bytes short of its Content-Length \(1000\)"
        ),
    ):
        http.request(sink, "/sink", method="PUT", body=f)


@pytest.mark.parametrize(
    "body",
    [
        b"name=tap",
        bytearray(b"x" * 4000),
        memoryview(b""),
        memoryview(array.array("i", range(100))),  # 400 bytes, len() 100
        memoryview(b"0123456789")[::2],  # strided: no cast("B"), so copied
    ],
    ids=["bytes", "bytearray", "empty", "ints", "strided"],
)
def test_a_body_in_memory_goes_out_with_the_head_in_one_write(
    sockdir: Path, body: bytes | bytearray | memoryview
) -> None:
    # A server that answers from the head alone (an app that never reads the body) must
    # not be able to answer before the body is on its way.
    with scripted_server(str(sockdir / "once.sock"), first_read) as address:
        seen = http.request(address, "/form", method="POST", body=body).body
    head, _, rest = seen.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /form HTTP/1.1\r\n")
    assert b"content-length: %d" % len(bytes(body)) in head.lower()
    assert rest == bytes(body)


def test_a_body_that_contradicts_its_given_length_is_refused(sink: udskit.Address) -> None:
    with pytest.raises(ValueError, match="Too little data for declared Content-Length"):
        http.request(sink, "/sink", method="PUT", body=b"abc", headers=[("Content-Length", "9")])


@pytest.mark.parametrize("size", [BODY_CHUNK + 1, 3 * BODY_CHUNK])
@pytest.mark.parametrize("source", ["memory", "file"])
def test_a_large_body_that_contradicts_its_given_length_is_refused_before_connecting(
    sockdir: Path, size: int, source: str
) -> None:
    # Nothing listens there: an error raised after connecting would be ConnectError (and
    # against a server, the head would have gone out alone).
    (sockdir / "body.bin").write_bytes(bytes(size))
    with (sockdir / "body.bin").open("rb") as f:
        body = f if source == "file" else bytes(size)
        for declared, much in ((size - 1, "much"), (size + 1, "little"), (5, "much")):
            with pytest.raises(ValueError, match=f"Too {much} data for declared Content-Length"):
                http.request(
                    sockdir / "nobody.sock",
                    "/sink",
                    method="PUT",
                    body=body,
                    headers=[("Content-Length", str(declared))],
                )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("str", r"not str \(encode the text\)"),
        ("text file", r"binary mode \('rb'\), not in text mode"),
        ("int", "not int"),
    ],
)
def test_a_body_of_the_wrong_type_is_refused_before_connecting(
    sockdir: Path, kind: str, message: str
) -> None:
    # Nothing listens there: an error raised after connecting would be ConnectError.
    (sockdir / "text.txt").write_text("name=tap")
    with (sockdir / "text.txt").open() as text:
        body = {"str": "name=tap", "text file": text, "int": 42}[kind]
        with pytest.raises(TypeError, match=message):
            http.request(sockdir / "nobody.sock", "/form", method="POST", body=body)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["timeout", "max_time"])
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_seconds_must_be_positive(sink: udskit.Address, name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a positive number of seconds"):
        http.request(sink, "/", **{name: bad})
