"""udskit.http and ``udskit http`` against a stdlib HTTP server and scripted non-HTTP peers:
every address form, proxies ignored, the probe's verdicts, bad input, a missing extra.
(The same client against gunicorn and nginx is in tests/e2e.)"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import udskit
from udskit import http

from .cli import run_udskit
from .httpd import http_server
from .peers import LoopThread, StreamServer, echo_server, loop_thread

#: Proxy variables pointing at a port where nothing listens: a client that honoured them
#: for a socket address would fail.
DEAD_PROXIES = dict.fromkeys(
    ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"),
    "http://127.0.0.1:9",
)


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    with loop_thread("asyncio") as started:
        yield started


@pytest.fixture(params=["path", "abstract", "long"])
def http_address(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[udskit.Address]:
    if request.param == "abstract":
        where = f"@udskit-http-{os.getpid()}"
    elif request.param == "long":
        deep = sockdir / ("x" * 70) / ("y" * 70)
        deep.mkdir(parents=True)
        where = str(deep / "app.sock")
    else:
        where = str(sockdir / "app.sock")
    with http_server(where) as address:
        yield address


@pytest.fixture
def http_path(sockdir: Path) -> Iterator[udskit.Address]:
    """One server on a plain path, for the CLI's tests (each one starts a process)."""
    with http_server(str(sockdir / "app.sock")) as address:
        yield address


def test_request_every_address_form(http_address: udskit.Address) -> None:
    response = http.request(
        http_address, "/items?page=2", method="PUT", headers=[("X-Test", "1")], body=b"data"
    )
    assert response.status == 200
    echoed = response.json()
    assert isinstance(echoed, dict)
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/items?page=2"
    assert echoed["body"] == "data"
    assert echoed["headers"]["host"] == "localhost"
    assert echoed["headers"]["x-test"] == "1"
    assert echoed["headers"]["user-agent"].startswith("udskit/")


def test_cli_ignores_proxy_variables(http_address: udskit.Address) -> None:
    env = {**os.environ, **DEAD_PROXIES}
    result = run_udskit("http", str(http_address), "/hello", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/hello"


def test_httpx_client_ignores_proxy_variables(
    http_address: udskit.Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DEAD_PROXIES.items():
        monkeypatch.setenv(name, value)
    with http.client(http_address) as client:
        first = client.post("/a", content=b"one")
        second = client.get("/b", headers={"X-Test": "2"})
    assert (first.status_code, first.json()["body"]) == (200, "one")
    assert second.json()["headers"]["x-test"] == "2"


def test_async_httpx_client(http_address: udskit.Address) -> None:
    async def fetch() -> list[object]:
        async with http.async_client(http_address) as client:
            responses = await asyncio.gather(*(client.get(f"/n{i}") for i in range(5)))
        return [r.json()["path"] for r in responses]

    assert asyncio.run(fetch()) == [f"/n{i}" for i in range(5)]


def test_httpx_explains_connect_failures(sockdir: Path) -> None:
    missing = sockdir / "missing.sock"
    with http.client(missing) as client, pytest.raises(httpx.ConnectError, match="no such file"):
        client.get("/")
    (sockdir / "file").write_text("")
    with (
        http.client(sockdir / "file") as client,
        pytest.raises(httpx.ConnectError, match="is not a socket"),
    ):
        client.get("/")

    async def fetch() -> None:
        async with http.async_client(missing) as client:
            await client.get("/")

    with pytest.raises(httpx.ConnectError, match="no such file"):
        asyncio.run(fetch())


def test_httpx_refuses_https(http_address: udskit.Address) -> None:
    with (
        httpx.Client(transport=http.transport(http_address)) as client,
        pytest.raises(httpx.ConnectError, match="https:// is not supported"),
    ):
        client.get("https://localhost/")


def test_probe_says_http(http_address: udskit.Address) -> None:
    found = http.probe(http_address)
    assert found.speaks_http
    assert found.status == 200
    assert found.server is not None
    assert found.server.startswith("BaseHTTP")
    assert "speaks HTTP/1.1" in str(found)


def test_probe_on_an_echo_server(servers: LoopThread, sockdir: Path) -> None:
    with echo_server(servers, str(sockdir / "echo.sock")) as echo:
        found = http.probe(echo.address)
    assert not found.speaks_http
    assert found.status is None
    assert "does not answer in HTTP/1.1" in found.detail


def test_probe_on_a_silent_server(servers: LoopThread, sockdir: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; the probe gives up and closes
        writer.close()

    server = StreamServer(servers, str(sockdir / "silent.sock"), silent)
    try:
        found = http.probe(server.address, timeout=0.2)
    finally:
        server.close()
    assert not found.speaks_http
    assert "no HTTP answer within 0.2 s" in found.detail


def test_probe_on_a_server_that_hangs_up(servers: LoopThread, sockdir: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = StreamServer(servers, str(sockdir / "rude.sock"), hang_up)
    try:
        found = http.probe(server.address)
    finally:
        server.close()
    assert not found.speaks_http
    assert "without an HTTP response" in found.detail or "closed" in found.detail


def test_probe_when_nothing_listens(sockdir: Path) -> None:
    found = http.probe(sockdir / "gone.sock")
    assert not found.speaks_http
    assert "no such file" in found.detail
    with pytest.raises(udskit.AddressError):
        http.probe("nope:x")


def test_cli_output_forms(http_path: udskit.Address) -> None:
    shown = run_udskit("http", "-i", str(http_path), "/x")
    head, _, body = shown.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: application/json" in head or b"\r\ncontent-type" in head.lower()
    assert json.loads(body)["path"] == "/x"
    as_json = json.loads(run_udskit("http", "--json", str(http_path), "/missing").stdout)
    assert as_json["status"] == 404
    assert json.loads(as_json["body"])["path"] == "/missing"
    assert ["content-type", "application/json"] in as_json["headers"]


def test_cli_data_and_methods(http_path: udskit.Address, sockdir: Path) -> None:
    posted = json.loads(run_udskit("http", "-d", "a=1", str(http_path), "/f").stdout)
    assert (posted["method"], posted["body"]) == ("POST", "a=1")
    assert posted["headers"]["content-type"] == "application/x-www-form-urlencoded"
    body_file = sockdir / "body.json"
    body_file.write_text('{"k": "v"}')
    from_file = run_udskit(
        "http", "-X", "PUT", "-H", "Content-Type: application/json", "-d", f"@{body_file}",
        str(http_path), "/g",
    )  # fmt: skip
    sent = json.loads(from_file.stdout)
    assert (sent["method"], sent["body"]) == ("PUT", '{"k": "v"}')
    assert sent["headers"]["content-type"] == "application/json"
    piped = run_udskit("http", "-d", "@-", str(http_path), "/h", stdin=b"from stdin")
    assert json.loads(piped.stdout)["body"] == "from stdin"
    url = run_udskit("http", str(http_path), "http://app.internal/p?q=1")
    assert json.loads(url.stdout)["path"] == "/p?q=1"
    assert json.loads(url.stdout)["headers"]["host"] == "app.internal"


def test_cli_fail_flag(http_path: udskit.Address) -> None:
    assert run_udskit("http", str(http_path), "/missing").returncode == 0
    assert run_udskit("http", "-f", str(http_path), "/missing").returncode == 1
    assert run_udskit("http", "-f", str(http_path), "/fine").returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["SOCK", "health"], 2, "PATH must start with '/'"),
        (["SOCK", "https://x/"], 2, "only http:// URLs"),
        (
            ["SOCK", "http://[::1/x"],
            2,
            "error: PATH 'http://[::1/x' is not a valid URL",
        ),
        (["-H", "no-colon", "SOCK", "/"], 2, "-H takes 'Name: value'"),
        (["-H", "Bad Name: x", "SOCK", "/"], 2, "invalid HTTP request"),
        (["--timeout", "0", "SOCK", "/"], 2, "--timeout: '0' must be more than 0 seconds"),
        (["--max-time", "0", "SOCK", "/"], 2, "--max-time: '0' must be more than 0 seconds"),
        (["--max-time", "-1", "SOCK", "/"], 2, "--max-time: '-1' must be a finite number"),
        (["--max-time", "nan", "SOCK", "/"], 2, "--max-time: 'nan' must be a finite number"),
        (["--timeout", "inf", "SOCK", "/"], 2, "--timeout: 'inf' must be a finite number"),
        (["-d", "@/nonexistent/body", "SOCK", "/"], 1, "-d @/nonexistent/body: no such file"),
        (["-d", "@DIR", "SOCK", "/"], 1, "cannot read the body of -d @/tmp/uds-"),
        (["MISSING", "/"], 1, "no such file; is the server running"),
    ],
)
def test_cli_bad_input_is_one_line(
    http_path: udskit.Address, sockdir: Path, args: list[str], code: int, message: str
) -> None:
    replace = {"SOCK": str(http_path), "MISSING": str(sockdir / "missing.sock")}
    replace["@DIR"] = f"@{sockdir}"  # a directory where a body file was expected
    result = run_udskit("http", *(replace.get(a, a) for a in args))
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert message in err
    assert err.count("\n") == 1, err


def test_cli_not_http(servers: LoopThread, sockdir: Path) -> None:
    with echo_server(servers, str(sockdir / "echo.sock")) as echo:
        result = run_udskit("http", str(echo.address), "/")
    assert result.returncode == 1
    assert b"does not answer in HTTP/1.1" in result.stderr


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_cli_not_a_stream_socket(sockdir: Path, kind: int) -> None:
    # http has no --type: the message must not tell the user to pass one
    with socket.socket(socket.AF_UNIX, kind) as server:
        server.bind(str(sockdir / "other.sock"))
        if kind != socket.SOCK_DGRAM:
            server.listen()
        result = run_udskit("http", str(sockdir / "other.sock"), "/")
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.count("\n") == 1, err
    assert f"{sockdir / 'other.sock'}: it is not a stream socket" in err
    assert "--type" not in err
    assert "Traceback" not in err


_WITHOUT = "import sys; sys.modules[{name!r}] = None; from udskit.cli.main import main; "


def test_missing_extra_is_one_line(http_path: udskit.Address) -> None:
    import subprocess
    import sys

    script = _WITHOUT.format(name="h11") + f"sys.exit(main(['http', {str(http_path)!r}, '/']))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "udskit http: HTTP support needs the 'http' extra (h11 and httpx): "
        "pip install 'udskit[http]'\n"
    )
    # Without httpx, the CLI and the probe still work; only the httpx helpers say what is missing.
    script = (
        "import sys; sys.modules['httpx'] = None; from udskit import http; "
        f"print(http.probe({str(http_path)!r}).speaks_http); "
        "exec('try:\\n http.client(\"/x\")\\nexcept ModuleNotFoundError as e:\\n print(e)')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert result.stdout.decode().splitlines() == [
        "True",
        "HTTP support needs the 'http' extra (h11 and httpx): pip install 'udskit[http]'",
    ], result.stderr


def test_httpx_timeouts_and_hang_ups(servers: LoopThread, sockdir: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    quiet = StreamServer(servers, str(sockdir / "quiet.sock"), silent)
    rude = StreamServer(servers, str(sockdir / "rude.sock"), hang_up)
    try:
        with (
            http.client(quiet.address, timeout=0.2) as client,
            pytest.raises(httpx.ReadTimeout, match=r"no data within 0\.2 s"),
        ):
            client.get("/")
        with http.client(rude.address) as client, pytest.raises(httpx.RemoteProtocolError):
            client.get("/")

        async def fetch(address: udskit.Address) -> None:
            async with http.async_client(address, timeout=0.2) as client:
                await client.get("/")

        with pytest.raises(httpx.ReadTimeout, match=r"no data within 0\.2 s"):
            asyncio.run(fetch(quiet.address))
        with pytest.raises(httpx.RemoteProtocolError):
            asyncio.run(fetch(rude.address))
        with pytest.raises(udskit.Timeout, match="timed out"):
            http.request(quiet.address, "/", timeout=0.2)
    finally:
        quiet.close()
        rude.close()


def test_response_helpers(http_path: udskit.Address) -> None:
    response = http.request(http_path, "/helpers")
    assert response.status == 200
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Absent") is None
    assert '"path": "/helpers"' in response.text()
    with http.open_exchange(http_path, "/streamed") as exchange:
        assert exchange.head.status == 200
        assert b"".join(exchange.iter_body()).startswith(b"{")
