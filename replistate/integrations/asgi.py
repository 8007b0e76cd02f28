"""ASGI integration for Starlette and FastAPI: a replica in the app's lifespan, and
the operations API routes.

Usage with FastAPI::

    from fastapi import Depends, FastAPI
    from replistate import Replica
    from replistate.integrations import asgi as replistate_asgi

    app = FastAPI(lifespan=replistate_asgi.lifespan(make_replica))
    app.router.routes.extend(replistate_asgi.routes(prefix="/api"))

    @app.get("/replica")
    async def replica_id(
        replica: Replica = Depends(replistate_asgi.get_replica),
    ) -> str:
        return replica.replica_id

Usage with Starlette::

    app = Starlette(
        routes=[*my_routes, *replistate_asgi.routes(prefix="/api")],
        lifespan=replistate_asgi.lifespan(make_replica),
    )

Handlers reach the replica with ``get_replica(request)``. This module imports
Starlette only, so the ``asgi`` extra is enough. FastAPI apps are Starlette apps,
so they use it as it is.

Work started with `OperationsService.start_operation` runs in a task owned by the
replica. A request handler cancelled because its client went away stops neither
the admission nor the work, so only a cancel request or the replica's shutdown
ends it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from replistate.errors import NotStartedError
from replistate.integrations.api import (
    cancel_response,
    health_response,
    job_response,
    operations_body,
)
from replistate.replica import Replica

__all__ = ["STATE_KEY", "AppLifespan", "get_replica", "lifespan", "router", "routes"]

STATE_KEY = "replistate"
"""Name of the replica in the lifespan state and in ``app.state``."""

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""A lifespan as Starlette and FastAPI take it: a function of the app returning an
async context manager, which may yield a state mapping."""


def lifespan(
    replica: Replica | Callable[[], Replica], *, wrapped: AppLifespan | None = None
) -> Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any]]]:
    """Return a lifespan that starts the replica with the app and stops it on
    shutdown.

    Pass the result as ``lifespan=`` to `FastAPI` or `Starlette`. On start-up the
    replica is started, then stored as ``app.state.replistate`` and in the
    lifespan state under `STATE_KEY`. The server must support lifespan state, as
    uvicorn does, because Starlette fails the start-up otherwise. On shutdown
    the replica stops: operations it still runs are cancelled and marked failed,
    so no peer shows them running forever.

    Args:
        replica: the replica, or a function making it, called on each start-up.
        wrapped: a lifespan of your own, such as an
            ``@contextlib.asynccontextmanager`` function. It runs inside this
            one, so it can use the replica while it starts and stops. The state
            it yields is merged into the lifespan state.

    Raises:
        BusError: on start-up, the bus cannot be reached.
        StoreError: on start-up, the store cannot be reached.
        ValueError: on start-up, the state of `wrapped` already uses `STATE_KEY`.
    """

    @contextlib.asynccontextmanager
    async def replica_lifespan(app: Any) -> AsyncIterator[Mapping[str, Any]]:
        instance = replica if isinstance(replica, Replica) else replica()
        await instance.start()
        app_state = getattr(app, "state", None)
        try:
            if app_state is not None:
                setattr(app_state, STATE_KEY, instance)
            if wrapped is None:
                yield {STATE_KEY: instance}
            else:
                async with wrapped(app) as inner_state:
                    yield _merge_state(inner_state, instance)
        finally:
            if getattr(app_state, STATE_KEY, None) is instance:
                delattr(app_state, STATE_KEY)
            await instance.stop()

    return replica_lifespan


def _merge_state(
    inner_state: Mapping[str, Any] | None, instance: Replica
) -> dict[str, Any]:
    state = dict(inner_state or {})
    if STATE_KEY in state:
        raise ValueError(
            f"the wrapped lifespan yielded a state with the key {STATE_KEY!r}, "
            "which is reserved for the replica, so rename that key"
        )
    state[STATE_KEY] = instance
    return state


def get_replica(connection: HTTPConnection) -> Replica:
    """Return the replica started by `lifespan`.

    Use it in a handler as ``get_replica(request)``, or as a FastAPI dependency:
    ``replica: Replica = Depends(get_replica)``. The lifespan state is read
    first, so the replica is also found from a sub-application mounted in the
    app that runs the lifespan.

    Args:
        connection: the request or WebSocket.

    Raises:
        NotStartedError: the app's lifespan did not start a replica.
    """
    scope = connection.scope
    found = scope.get("state", {}).get(STATE_KEY)
    if not isinstance(found, Replica):
        app_state = getattr(scope.get("app"), "state", None)
        found = getattr(app_state, STATE_KEY, None)
    if not isinstance(found, Replica):
        raise NotStartedError(
            "no replistate replica found on this app: pass "
            "replistate.integrations.asgi.lifespan(...) as the app's lifespan and "
            "serve the app with lifespan events on (uvicorn runs them by default)"
        )
    return found


def routes(prefix: str = "/api") -> list[Route]:
    """Return the operations API routes, under `prefix`.

    - ``GET {prefix}/operations``: every operation in the OpCache;
    - ``GET {prefix}/operations/{job_id}``: the status of one job;
    - ``POST {prefix}/operations/{job_id}/cancel``: cancel a job on any replica;
    - ``GET {prefix}/ready``: 200 when the replica is ready, else 503.

    Add them with ``Starlette(routes=...)``, ``FastAPI(routes=...)`` or
    ``app.router.routes.extend(...)``. They are plain Starlette routes, so FastAPI
    leaves them out of its OpenAPI schema.
    """
    prefix = prefix.rstrip("/")
    return [
        Route(
            f"{prefix}/operations",
            _list_operations,
            methods=["GET"],
            name="replistate_operations",
        ),
        Route(
            f"{prefix}/operations/{{job_id}}",
            _get_job,
            methods=["GET"],
            name="replistate_job",
        ),
        Route(
            f"{prefix}/operations/{{job_id}}/cancel",
            _cancel_job,
            methods=["POST"],
            name="replistate_cancel",
        ),
        Route(f"{prefix}/ready", _ready, methods=["GET"], name="replistate_ready"),
    ]


def router() -> Router:
    """Return the operations API routes in a router, for ``app.mount(prefix, ...)``.

    A mount takes every path under its prefix, so a route of the app under the
    same prefix is found only when it was added before the mount. Use `routes`
    to share a prefix such as ``/api`` with routes of your own.
    """
    return Router(routes=routes(prefix=""))


async def _list_operations(request: Request) -> Response:
    return Response(
        operations_body(get_replica(request)), media_type="application/json"
    )


async def _get_job(request: Request) -> JSONResponse:
    status, body = await job_response(
        get_replica(request), request.path_params["job_id"]
    )
    return JSONResponse(body, status_code=status)


async def _cancel_job(request: Request) -> JSONResponse:
    status, body = await cancel_response(
        get_replica(request), request.path_params["job_id"]
    )
    return JSONResponse(body, status_code=status)


async def _ready(request: Request) -> JSONResponse:
    status, body = health_response(get_replica(request))
    return JSONResponse(body, status_code=status)
