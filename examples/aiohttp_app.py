"""A model server replica on aiohttp, kept in sync with its peers by replistate.

Run one replica::

    python examples/aiohttp_app.py --nats-url nats://127.0.0.1:4222 \\
        --postgres-url postgresql://127.0.0.1/test --models-dir /tmp/models

It prints one JSON line, ``{"event": "listening", "port": ..., "replica_id": ...}``,
once it serves requests. Routes:

- ``GET /``: the operations page;
- ``POST /api/models/install/{id}``: start installing a model, owned by this replica;
- ``GET /api/models``: the installed models;
- ``GET /api/models/job/{job_id}``: the status of one job;
- ``GET /api/operations``: every operation, as the web UI polls it;
- ``GET /api/operations/{job_id}``: the status of one job;
- ``POST /api/operations/{job_id}/cancel``: cancel a job, whichever replica runs it;
- ``GET /api/ready`` and ``GET /healthz``: 200 when the replica is ready, else 503.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web
from model_server import (
    ModelServer,
    Settings,
    announce,
    configure_logging,
    parse_settings,
    read_page,
)

from replistate.integrations import aiohttp as replistate_aiohttp
from replistate.integrations.api import health_response, job_response

SERVER_KEY = web.AppKey("model_server", ModelServer)


async def install(request: web.Request) -> web.Response:
    """Start installing the model named in the path."""
    status, body = await request.app[SERVER_KEY].install(
        request.app[replistate_aiohttp.REPLICA_KEY], request.match_info["model_id"]
    )
    return web.json_response(body, status=status)


async def list_models(request: web.Request) -> web.Response:
    """Return the models this replica has loaded."""
    return web.json_response(request.app[SERVER_KEY].models())


async def job_status(request: web.Request) -> web.Response:
    """Return the status of one job."""
    status, body = await job_response(
        request.app[replistate_aiohttp.REPLICA_KEY], request.match_info["job_id"]
    )
    return web.json_response(body, status=status)


async def healthz(request: web.Request) -> web.Response:
    """Return 200 when the replica is ready, 503 otherwise."""
    status, body = health_response(request.app[replistate_aiohttp.REPLICA_KEY])
    return web.json_response(body, status=status)


async def page(request: web.Request) -> web.Response:
    """Return the operations page."""
    return web.Response(text=read_page(), content_type="text/html")


def make_app(settings: Settings) -> web.Application:
    """Build the application for the given settings."""
    app = web.Application()
    server = ModelServer(settings)
    app[SERVER_KEY] = server
    replistate_aiohttp.setup(app, server.make_replica)
    app.add_routes(
        [
            web.get("/", page),
            web.post("/api/models/install/{model_id}", install),
            web.get("/api/models", list_models),
            web.get("/api/models/job/{job_id}", job_status),
            web.get("/healthz", healthz),
        ]
    )
    app.add_routes(replistate_aiohttp.routes(prefix="/api"))
    return app


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop the replica."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runner = web.AppRunner(make_app(settings))
    await runner.setup()
    listener = socket.create_server((settings.host, settings.port))
    site = web.SockSite(runner, listener)
    await site.start()
    announce(listener.getsockname()[1], settings.replica_id)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run one replica."""
    settings = parse_settings(argv, __doc__.splitlines()[0])
    configure_logging(settings.replica_id)
    # One line per request would bury the replication events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
