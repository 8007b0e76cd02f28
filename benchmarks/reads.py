"""How fast `GET /api/operations` responds with many active operations.

Two aiohttp servers on loopback return the same body for the same request: one
with replistate's route, from the replica's mirror, the other by reading the table
on every request, as an app without a mirror must. A client in the same process
sends requests one after the other to each and times them.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from psycopg import sql

from benchmarks.common import Scope, Servers, make_replica, table_dropped
from benchmarks.hydration import _BASELINE_QUERY, fill
from replistate.integrations import aiohttp as replistate_aiohttp
from replistate.models import OpState


def table_app(servers: Servers, scope: Scope) -> web.Application:
    """Return an app that reads the table on every `GET /api/operations` and
    builds the same entries as replistate's route from the columns."""
    query = sql.SQL(_BASELINE_QUERY).format(table=sql.Identifier(scope.table))
    app = web.Application()

    async def operations(request: web.Request) -> web.Response:
        conn = request.app[CONNECTION_KEY]
        cursor = await conn.execute(
            query, {"terminal": ["completed", "failed", "cancelled"]}
        )
        entries = []
        for row in await cursor.fetchall():
            job_id, name, cache_key, is_backend = row[0], row[1], row[2], row[3]
            state, progress, message, error = OpState(row[5]), row[6], row[7], row[8]
            entry: dict[str, Any] = {
                "id": cache_key,
                "name": name or cache_key,
                "jobID": job_id,
                "progress": int(progress),
                "taskType": "installation",
                "isDeletion": False,
                "isBackend": is_backend,
                "isQueued": state is OpState.PENDING,
                "isCancelled": False,
                "cancellable": row[13],
                "message": message,
            }
            if error is not None:
                entry["error"] = error
            entries.append(entry)
        return web.json_response({"operations": entries})

    async def connection(app: web.Application) -> Any:
        app[CONNECTION_KEY] = await psycopg.AsyncConnection.connect(
            servers.postgres_url, autocommit=True
        )
        yield
        await app[CONNECTION_KEY].close()

    app.cleanup_ctx.append(connection)
    app.add_routes([web.get("/api/operations", operations)])
    return app


CONNECTION_KEY = web.AppKey("connection", psycopg.AsyncConnection)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free loopback port; return its runner and base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    return runner, f"http://127.0.0.1:{listener.getsockname()[1]}"


async def time_requests(
    session: aiohttp.ClientSession, url: str, requests: int, expected: int
) -> list[float]:
    """Return the seconds each of `requests` sequential GETs of `url` took."""
    latencies = []
    for _ in range(requests):
        began = time.perf_counter()
        async with session.get(url) as response:
            body = await response.read()
        latencies.append(time.perf_counter() - began)
        if response.status != 200:
            raise RuntimeError(f"GET {url}: status {response.status}")
    count = body.count(b'"jobID"')
    if count != expected:
        raise RuntimeError(f"GET {url} listed {count} operations, expected {expected}")
    return latencies


async def measure(
    servers: Servers, operations: int, requests: int
) -> tuple[list[float], list[float]]:
    """Return the request times of replistate's route and of the table reader."""
    scope = Scope.new()
    async with table_dropped(servers, scope), contextlib.AsyncExitStack() as stack:
        await fill(servers, scope, operations)
        replica = make_replica(servers, scope, "bench-reads", bus=False)
        ours = web.Application()
        replistate_aiohttp.setup(ours, replica)
        ours.add_routes(replistate_aiohttp.routes(prefix="/api"))
        ours_runner, ours_url = await serve(ours)
        stack.push_async_callback(ours_runner.cleanup)
        table_runner, table_url = await serve(table_app(servers, scope))
        stack.push_async_callback(table_runner.cleanup)
        async with aiohttp.ClientSession() as session:
            # One untimed round of each warms both paths.
            await time_requests(session, f"{ours_url}/api/operations", 5, operations)
            await time_requests(session, f"{table_url}/api/operations", 5, operations)
            mirror = await time_requests(
                session, f"{ours_url}/api/operations", requests, operations
            )
            table = await time_requests(
                session, f"{table_url}/api/operations", requests, operations
            )
        return mirror, table
