"""The round-robin proxy of the examples, against upstreams on loopback."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 10.0

INVALID_TARGET = (
    "the proxy forwards only paths that start with '/', not absolute URLs or '*'"
)


@attrs.frozen
class Reply:
    """A parsed HTTP/1.1 response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw(port: int, request_line: str) -> Reply:
    """Send one request with `request_line` as written; return the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{request_line}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode("ascii"))
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


@attrs.define
class Setup:
    """A proxy in front of two upstreams, and the paths each upstream received."""

    port: int
    proxy: Any
    received: dict[str, list[str]]


@pytest.fixture
async def proxied(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    rrproxy = importlib.import_module("rrproxy")
    received: dict[str, list[str]] = {"u1": [], "u2": []}
    runners = []
    upstreams = []
    for name in received:

        async def echo(request: web.Request, name: str = name) -> web.Response:
            received[name].append(request.raw_path)
            return web.json_response({"upstream": name, "path": request.raw_path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        upstreams.append(rrproxy.Upstream(name, f"http://127.0.0.1:{port}"))
    proxy = rrproxy.RoundRobinProxy(upstreams, timeout=TIMEOUT)
    port = await proxy.start("127.0.0.1", 0)
    try:
        yield Setup(port, proxy, received)
    finally:
        await proxy.close()
        for runner in runners:
            await runner.cleanup()


async def test_proxy_forwards_in_turn(proxied: Setup) -> None:
    first = await send_raw(proxied.port, "GET /a?x=1 HTTP/1.1")
    second = await send_raw(proxied.port, "GET /b HTTP/1.1")

    assert first.status == 200
    assert first.json() == {"upstream": "u1", "path": "/a?x=1"}
    assert first.headers["x-served-by"] == "u1"
    assert second.json() == {"upstream": "u2", "path": "/b"}
    assert proxied.received == {"u1": ["/a?x=1"], "u2": ["/b"]}


@pytest.mark.parametrize(
    "request_line",
    [
        "GET http://127.0.0.1:9/models HTTP/1.1",
        "GET http://127.0.0.1:9/_proxy/log HTTP/1.1",
        "OPTIONS * HTTP/1.1",
    ],
)
async def test_proxy_rejects_non_path_target(
    request_line: str, proxied: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A target other than a path gets 400 and a log record, reaches no upstream
    and does not advance the rotation."""
    method, target, _ = request_line.split()

    with caplog.at_level(logging.DEBUG):
        rejected = await send_raw(proxied.port, request_line)
        after = await send_raw(proxied.port, "GET /after HTTP/1.1")
        log = await send_raw(proxied.port, "GET /_proxy/log HTTP/1.1")

    assert rejected.status == 400
    error = f"invalid request target {target!r}: {INVALID_TARGET}"
    assert rejected.json() == {"error": error}
    assert after.json() == {"upstream": "u1", "path": "/after"}
    assert proxied.received == {"u1": ["/after"], "u2": []}
    assert log.json() == {
        "requests": [
            {
                "seq": 1,
                "method": method,
                "path": target,
                "upstream": None,
                "status": 400,
                "error": error,
            },
            {
                "seq": 2,
                "method": "GET",
                "path": "/after",
                "upstream": "u1",
                "status": 200,
            },
        ]
    }
    proxy_lines = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "rrproxy"
    ]
    assert proxy_lines == [("WARNING", f"rejected {method} request: {error}")]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:notaport",
        "http://:80",
        "127.0.0.1:8001",
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:8001/",
        "http://127.0.0.1:8001?x=1",
    ],
)
def test_proxy_rejects_invalid_upstream_url(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    rrproxy = importlib.import_module("rrproxy")

    message = (
        f"invalid URL {url!r} of upstream 'u1': give http://HOST:PORT, optionally "
        "with a path, without a trailing slash"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        rrproxy.RoundRobinProxy([rrproxy.Upstream("u1", url)])
