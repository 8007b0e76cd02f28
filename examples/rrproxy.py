"""A round-robin reverse proxy that records which upstream served each request.

Each request goes to the next upstream in turn, as behind a round-robin load
balancer, and its response carries the upstream's name in the ``X-Served-By``
header. Paths under ``/_proxy/`` are the proxy's own control endpoints. They are
neither forwarded nor recorded, and they do not advance the rotation:

- ``GET /_proxy/upstreams``: the upstreams in rotation order;
- ``GET /_proxy/next``: the upstream the next forwarded request goes to;
- ``GET /_proxy/log?since=SEQ``: the recorded requests whose sequence number is
  above SEQ (all kept ones without it), oldest first.

A test can read ``/_proxy/next``, send harmless requests until a chosen upstream
is next, and then read ``/_proxy/log`` to check where its request landed.

The proxy forwards only origin-form request targets, which start with ``/``. It
rejects any other target, such as the absolute form ``GET http://host/path`` or
``OPTIONS *``, with 400 and records it with no upstream, without advancing the
rotation.
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
from collections.abc import Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

logger = logging.getLogger("rrproxy")

SERVED_BY = "X-Served-By"
"""Response header naming the upstream that served the request."""

# Hop-by-hop headers describe one connection, not the message, so they are not
# forwarded. Content-Length is left out too because aiohttp sets it again.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


@attrs.frozen
class Upstream:
    """A server the proxy forwards to, such as one replica of an app."""

    name: str
    url: str
    """Base URL without a trailing slash, such as ``http://127.0.0.1:8001``."""


@attrs.define
class RequestRecord:
    """One request received for forwarding, and the upstream it went to."""

    seq: int
    method: str
    path: str
    upstream: str | None
    """Name of the upstream, or None for a request rejected before forwarding."""
    status: int | None = None
    """HTTP status of the response; None until the upstream responds."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the record as the log endpoint lists it."""
        body: dict[str, Any] = {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "upstream": self.upstream,
            "status": self.status,
        }
        if self.error is not None:
            body["error"] = self.error
        return body


def _check_base_url(upstream: Upstream) -> None:
    """Raise ValueError unless `upstream.url` is an HTTP base URL that a
    request target can follow."""
    try:
        url = URL(upstream.url)
        valid = (
            url.scheme in ("http", "https")
            and bool(url.host)
            and not upstream.url.endswith("/")
            and not url.query_string
            and not url.fragment
        )
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"invalid URL {upstream.url!r} of upstream {upstream.name!r}: give "
            "http://HOST:PORT, optionally with a path, without a trailing slash"
        )


class RoundRobinProxy:
    """Forward each request to the next upstream in turn.

    Args:
        upstreams: the servers in rotation order; at least one.
        log_size: how many of the latest requests the log keeps.
        timeout: seconds an upstream has to respond before the proxy returns 502.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        log_size: int = 10_000,
        timeout: float = 30.0,
    ) -> None:
        if not upstreams:
            raise ValueError("a round-robin proxy needs at least one upstream")
        for upstream in upstreams:
            _check_base_url(upstream)
        self.upstreams = list(upstreams)
        self._timeout = timeout
        self._turn = 0
        self._seq = itertools.count(1)
        self._log: collections.deque[RequestRecord] = collections.deque(maxlen=log_size)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def next_upstream(self) -> Upstream:
        """The upstream the next forwarded request goes to."""
        return self.upstreams[self._turn % len(self.upstreams)]

    def make_app(self) -> web.Application:
        """Build the proxy application: control routes, then a catch-all."""
        app = web.Application(middlewares=[self._reject_other_targets])
        app.add_routes(
            [
                web.get("/_proxy/upstreams", self._list_upstreams),
                web.get("/_proxy/next", self._show_next),
                web.get("/_proxy/log", self._show_log),
                web.route("*", "/_proxy/{tail:.*}", self._unknown_control),
                web.route("*", "/{tail:.*}", self._forward),
            ]
        )
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on `host` and `port` (0 picks a free one); return the port."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            # Cookies belong to the browser, not to the proxy, and bodies pass
            # through with their Content-Encoding as the upstream sent them.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        listener = socket.create_server((host, port))
        await web.SockSite(self._runner, listener).start()
        bound_port: int = listener.getsockname()[1]
        return bound_port

    async def close(self) -> None:
        """Stop serving and close the connections to the upstreams."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @web.middleware
    async def _reject_other_targets(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Reject with 400 a request target that is not an origin-form path.

        The upstream URL is the upstream's base URL followed by the request
        target, which makes sense only for a target that starts with '/'. The
        router has matched the request already, so this also covers targets that
        match no route, such as ``*``.
        """
        if request.raw_path.startswith("/"):
            return await handler(request)
        error = (
            f"invalid request target {request.raw_path!r}: the proxy forwards only "
            "paths that start with '/', not absolute URLs or '*'"
        )
        self._log.append(
            RequestRecord(
                seq=next(self._seq),
                method=request.method,
                path=request.raw_path,
                upstream=None,
                status=400,
                error=error,
            )
        )
        logger.warning("rejected %s request: %s", request.method, error)
        return web.json_response({"error": error}, status=400)

    async def _list_upstreams(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"upstreams": [attrs.asdict(upstream) for upstream in self.upstreams]}
        )

    async def _show_next(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"upstream": attrs.asdict(self.next_upstream), "turn": self._turn}
        )

    async def _show_log(self, request: web.Request) -> web.Response:
        text = request.query.get("since", "0")
        try:
            since = int(text)
        except ValueError:
            return web.json_response(
                {"error": f"invalid since {text!r}: give a sequence number"},
                status=400,
            )
        records = [record.to_json() for record in self._log if record.seq > since]
        return web.json_response({"requests": records})

    async def _unknown_control(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "error": f"no proxy control endpoint {request.method} {request.path}",
                "endpoints": ["/_proxy/upstreams", "/_proxy/next", "/_proxy/log"],
            },
            status=404,
        )

    async def _forward(self, request: web.Request) -> web.Response:
        # Pick the upstream before the first await, so requests take their
        # turns in the order they arrived.
        upstream = self.next_upstream
        self._turn += 1
        record = RequestRecord(
            seq=next(self._seq),
            method=request.method,
            path=request.raw_path,
            upstream=upstream.name,
        )
        self._log.append(record)

        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _NOT_FORWARDED and name.lower() != "host"
        )
        headers["X-Forwarded-Host"] = request.host
        if request.remote is not None:
            headers["X-Forwarded-For"] = request.remote
        body = await request.read()
        assert self._session is not None, "the proxy is not started"
        url = URL(upstream.url + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
        except ValueError as exc:
            # yarl raises ValueError on a URL it cannot parse, and aiohttp's
            # InvalidURL is one too. The base URL was checked at start and the
            # middleware lets only paths through, so the path is to blame.
            record.status = 400
            record.error = f"invalid request target {request.raw_path!r}: {exc}"
            logger.warning("rejected %s request: %s", request.method, record.error)
            return web.json_response({"error": record.error}, status=400)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            record.status = 502
            record.error = reason
            return web.json_response(
                {"error": f"{upstream.name} at {upstream.url} failed: {reason}"},
                status=502,
                headers={SERVED_BY: upstream.name},
            )

        record.status = response.status
        response_headers = CIMultiDict(
            (name, value)
            for name, value in response.headers.items()
            if name.lower() not in _NOT_FORWARDED
        )
        response_headers[SERVED_BY] = upstream.name
        return web.Response(
            status=response.status, body=payload, headers=response_headers
        )
