"""aiohttp integration: a replica in the app's cleanup context, and the API routes.

Usage::

    from replistate.integrations import aiohttp as replistate_aiohttp

    app = web.Application()
    replistate_aiohttp.setup(app, lambda: Replica(config, bus=bus, store=store))
    app.add_routes(replistate_aiohttp.routes(prefix="/api"))

Handlers reach the replica as ``request.app[REPLICA_KEY]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from replistate.integrations.api import (
    cancel_response,
    health_response,
    job_response,
    operations_body,
)
from replistate.replica import Replica

__all__ = ["REPLICA_KEY", "routes", "setup"]

REPLICA_KEY = web.AppKey("replistate_replica", Replica)
"""Key of the app's replica."""


def setup(app: web.Application, replica: Replica | Callable[[], Replica]) -> None:
    """Start the replica with the app and stop it on shutdown.

    Args:
        app: the application.
        replica: the replica, or a function making it, called on start-up.
    """

    async def replica_context(app: web.Application) -> AsyncIterator[None]:
        instance = replica if isinstance(replica, Replica) else replica()
        await instance.start()
        app[REPLICA_KEY] = instance
        yield
        await instance.stop()

    app.cleanup_ctx.append(replica_context)


def routes(prefix: str = "/api") -> list[web.RouteDef]:
    """Return the operations API routes, mounted under `prefix`.

    - ``GET {prefix}/operations``: every operation in the OpCache;
    - ``GET {prefix}/operations/{job_id}``: the status of one job;
    - ``POST {prefix}/operations/{job_id}/cancel``: cancel a job on any replica;
    - ``GET {prefix}/ready``: 200 when the replica is ready, else 503.
    """
    prefix = prefix.rstrip("/")

    async def list_operations(request: web.Request) -> web.Response:
        return web.Response(
            body=operations_body(request.app[REPLICA_KEY]),
            content_type="application/json",
        )

    async def get_job(request: web.Request) -> web.Response:
        status, body = await job_response(
            request.app[REPLICA_KEY], request.match_info["job_id"]
        )
        return web.json_response(body, status=status)

    async def cancel_job(request: web.Request) -> web.Response:
        status, body = await cancel_response(
            request.app[REPLICA_KEY], request.match_info["job_id"]
        )
        return web.json_response(body, status=status)

    async def ready(request: web.Request) -> web.Response:
        status, body = health_response(request.app[REPLICA_KEY])
        return web.json_response(body, status=status)

    return [
        web.get(f"{prefix}/operations", list_operations),
        web.get(f"{prefix}/operations/{{job_id}}", get_job),
        web.post(f"{prefix}/operations/{{job_id}}/cancel", cancel_job),
        web.get(f"{prefix}/ready", ready),
    ]
