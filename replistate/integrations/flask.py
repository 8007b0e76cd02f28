"""Flask integration: a replica per process on an event-loop thread, blocking calls
into it, and the operations API blueprint.

Usage::

    from flask import Flask
    from replistate import NatsBus, PostgresGalleryStore, Replica
    from replistate.integrations.flask import Replistate, operations_blueprint

    def make_replica() -> Replica:
        return Replica(
            bus=NatsBus("nats://127.0.0.1:4222"),
            store=PostgresGalleryStore("postgresql://127.0.0.1/app"),
        )

    app = Flask(__name__)
    replistate = Replistate(app, make_replica)
    app.register_blueprint(operations_blueprint(prefix="/api"))

The replica is asyncio code. Each process runs it on one daemon thread with an
event loop of its own, and Flask views reach it through blocking calls that wait at
most a timeout each. Loop and replica are made on first use in the process that
uses them. A process forked after that, such as a gunicorn worker under
``--preload``, leaves the copies it inherited alone and makes its own.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, has_app_context

from replistate.errors import CallTimeoutError, ReplistateError
from replistate.integrations._loop_thread import (
    LOOP_STOP_TIMEOUT,
    EventLoopThread,
    check_timeout,
)
from replistate.integrations._thread_work import (
    BlockingOperationHandle,
    ThreadWork,
    in_thread,
    is_coroutine_function,
)
from replistate.integrations.api import (
    cancel_response,
    health_response,
    job_response,
    operations_body,
    operations_response,
)
from replistate.models import OpType
from replistate.replica import Replica
from replistate.runner import Work

__all__ = [
    "EXTENSION_KEY",
    "BlockingOperationHandle",
    "Replistate",
    "ThreadWork",
    "operations_blueprint",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXTENSION_KEY = "replistate"
"""Key of the extension's state in ``app.extensions``."""


_lock = threading.Lock()
_loop_thread: EventLoopThread | None = None
_app_states: weakref.WeakSet[_AppState] = weakref.WeakSet()
# Copies a forked child inherited from its parent, kept referenced so that no
# finalizer runs on them while the child lives.
_inherited: list[object] = []


def _current_loop_thread() -> EventLoopThread:
    """Return the event-loop thread of this process, starting it if needed."""
    global _loop_thread
    if _loop_thread is not None and _loop_thread.pid != os.getpid():
        # Forked without the fork handler, by a C extension for example.
        _forget_parent()
    with _lock:
        if _loop_thread is None:
            _loop_thread = EventLoopThread()
        return _loop_thread


def _forget_parent() -> None:
    """Drop the loop thread and replicas a forked child inherited.

    Run in the child after each fork. The copies stay referenced, because
    closing them would close connections and sockets the parent still uses.
    """
    global _lock, _loop_thread
    _lock = threading.Lock()
    inherited = _loop_thread
    _loop_thread = None
    if inherited is not None and inherited.pid != os.getpid():
        inherited.abandon()
        _inherited.append(inherited)
        logger.info(
            "process %d forked from %d: it leaves the parent's replicas alone and "
            "starts its own on first use",
            os.getpid(),
            inherited.pid,
        )
    for state in list(_app_states):
        state.forget_parent()


os.register_at_fork(after_in_child=_forget_parent)


def _stop_at_exit() -> None:
    """Stop the replicas this process started, then its event-loop thread."""
    global _loop_thread
    for state in list(_app_states):
        try:
            state.stop(None)
        except Exception:
            logger.exception("replica of app %r did not stop cleanly", state.app_name)
    loop_thread = _loop_thread
    if loop_thread is not None and loop_thread.pid == os.getpid():
        loop_thread.stop(LOOP_STOP_TIMEOUT + 1.0)
        _loop_thread = None


atexit.register(_stop_at_exit)


class _AppState:
    """The replica of one Flask app in this process, in ``app.extensions``."""

    def __init__(
        self, extension: Replistate, app_name: str, factory: Callable[[], Replica]
    ) -> None:
        self.extension = extension
        self.app_name = app_name
        self.factory = factory
        self.replica: Replica | None = None
        self.pid = os.getpid()
        self.lock = threading.Lock()
        _app_states.add(self)

    def forget_parent(self) -> None:
        """Drop the replica inherited from the parent process, without closing it."""
        if self.pid == os.getpid():
            return
        if self.replica is not None:
            _inherited.append(self.replica)
        self.replica = None
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def current(self) -> Replica | None:
        """Return the started replica of this process, or None."""
        if self.pid != os.getpid():
            _forget_parent()
        return self.replica

    def started(self, timeout: float) -> Replica:
        """Return the replica of this process, making and starting it if needed."""
        replica = self.current()
        if replica is not None:
            return replica
        call = f"start of the replica of app {self.app_name!r}"
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            raise CallTimeoutError(call, timeout)
        try:
            if self.replica is None:
                self.replica = self._start(call, deadline, timeout)
            return self.replica
        finally:
            self.lock.release()

    def _start(self, call: str, deadline: float, timeout: float) -> Replica:
        loop_thread = _current_loop_thread()
        created: list[Replica] = []

        async def start() -> Replica:
            # Made on the loop, so whatever asyncio objects it creates belong to it.
            replica = self.factory()
            if not isinstance(replica, Replica):
                raise TypeError(
                    f"the replica factory of app {self.app_name!r} returned "
                    f"{type(replica).__name__}, not a Replica"
                )
            created.append(replica)
            await replica.start()
            return replica

        async def stop_created() -> None:
            for replica in created:
                try:
                    await replica.stop()
                except Exception:
                    logger.exception(
                        "replica %r, started too late, did not stop cleanly",
                        replica.replica_id,
                    )

        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            return loop_thread.run(start, call, remaining)
        except CallTimeoutError:
            # The start may have finished just before its cancel arrived, so
            # whatever it made is stopped.
            asyncio.run_coroutine_threadsafe(stop_created(), loop_thread.loop)
            raise CallTimeoutError(call, timeout) from None

    def stop(self, timeout: float | None) -> None:
        """Stop the replica of this process, if it was started."""
        if self.current() is None:
            return
        # A start running in another thread ends first, within its own timeout.
        if not self.lock.acquire(timeout=self.extension.start_timeout):
            raise CallTimeoutError(
                f"stop of the replica of app {self.app_name!r}",
                self.extension.start_timeout,
            )
        try:
            replica, self.replica = self.replica, None
        finally:
            self.lock.release()
        if replica is None:
            return
        if timeout is None:
            timeout = replica.config.stop_grace_period + self.extension.timeout
        # A stop cut short would leave connections open, so it goes on after a
        # timeout.
        _current_loop_thread().run(
            replica.stop,
            f"stop of replica {replica.replica_id!r} of app {self.app_name!r}",
            timeout,
            cancel_on_timeout=False,
        )


class Replistate:
    """Flask extension running a replica per process and calling it from views.

    Each process that uses the extension runs the replica's asyncio code on one
    event-loop thread. The first call that needs the replica calls the factory
    and starts what it returns, in the process making the call. A process forked
    afterwards, such as a gunicorn worker under ``--preload``, makes a replica of
    its own on first use and leaves the copy it inherited to its parent. The
    replica stops at interpreter exit unless `stop` ran before.

    The methods that reach the replica block the calling thread, each for at
    most its `timeout` argument, else the extension's default, and raise
    `CallTimeoutError` when that runs out. The first of them in a process also
    waits for the start, for at most `start_timeout`.

    Args:
        app: the Flask app; `init_app` can set it up later instead.
        replica: a function returning a new `Replica`, called on first use in
            each process, and again after `stop` or a failed start. The
            `Replica` class itself gives a standalone replica.
        timeout: default seconds a call waits for the event loop.
        start_timeout: seconds the start of a replica may take, connecting to
            the bus and the store and hydrating included.
    """

    def __init__(
        self,
        app: Flask | None = None,
        replica: Callable[[], Replica] | None = None,
        *,
        timeout: float = 10.0,
        start_timeout: float = 30.0,
    ) -> None:
        self.timeout = check_timeout(timeout, "timeout")
        self.start_timeout = check_timeout(start_timeout, "start_timeout")
        self._factory = replica
        self._app: Flask | None = None
        if app is not None:
            self.init_app(app)
            self._app = app

    def init_app(
        self, app: Flask, replica: Callable[[], Replica] | None = None
    ) -> None:
        """Set the extension up on `app`.

        Args:
            app: the Flask app.
            replica: the replica factory of this app; the one given to the
                constructor when omitted.

        Raises:
            TypeError: no factory was given, or it is not callable.
            RuntimeError: replistate is already set up on `app`.
        """
        factory = replica or self._factory
        if factory is None:
            raise TypeError(
                "missing replica factory: pass a function returning a new Replica "
                "to Replistate() or init_app()"
            )
        if not callable(factory):
            raise TypeError(
                f"the replica factory must be callable, not {type(factory).__name__}: "
                "each process needs a replica of its own, so pass a function "
                "returning a new Replica"
            )
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"replistate is already set up on app {app.name!r}")
        app.extensions[EXTENSION_KEY] = _AppState(self, app.name, factory)

    def _state(self) -> _AppState:
        app = current_app if has_app_context() else self._app
        if app is None:
            raise RuntimeError(
                "no Flask app: call this within an app context, or pass the app "
                "to Replistate()"
            )
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, _AppState) or state.extension is not self:
            raise RuntimeError(
                f"this Replistate is not set up on app {app.name!r}: call "
                "init_app(app) first"
            )
        return state

    def _started(self, timeout: float | None = None) -> Replica:
        return self._state().started(timeout or self.start_timeout)

    def _run(
        self, function: Callable[[], Awaitable[T]], call: str, timeout: float | None
    ) -> T:
        return _current_loop_thread().run(function, call, timeout or self.timeout)

    # Lifecycle --------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the replica of the current app in this process, if not yet.

        Starting is optional: the first call that needs the replica starts it.

        Raises:
            CallTimeoutError: the start took longer than `timeout`, by default
                `start_timeout`; what it opened is closed again.
            BusError: the bus cannot be reached.
            StoreError: the store cannot be reached.
        """
        self._started(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the replica of the current app in this process, if started.

        Operations it runs are cancelled and, when still running after the
        grace period of the replica's config, marked failed, so no peer shows
        them running forever. A later call starts a new replica.

        Args:
            timeout: seconds to wait; by default the replica's stop grace
                period plus the extension's timeout. The stop goes on in the
                background after a timeout.
        """
        self._state().stop(timeout)

    @property
    def replica(self) -> Replica:
        """The replica of the current app in this process, started on first use.

        Its methods belong to the event loop thread: pass its coroutine methods
        to `call` rather than calling them from a view.
        """
        return self._started()

    @property
    def ready(self) -> bool:
        """Whether this process has started the replica and it is ready: hydrated
        and connected to the bus. Reading it starts nothing."""
        replica = self._state().current()
        return replica is not None and replica.ready

    # Blocking calls -----------------------------------------------------------

    def call(
        self,
        function: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,
    ) -> T:
        """Run ``await function(*args)`` on the event loop and return its result.

        The call itself is made on the loop thread. It does not start the
        replica: pass ``ext.replica`` or its methods for that. Keyword arguments
        go through `functools.partial`.

        Raises:
            CallTimeoutError: it took longer than `timeout`; the call is
                cancelled.
            RuntimeError: called from the event loop thread itself.
        """
        name = getattr(function, "__qualname__", type(function).__name__)
        return self._run(functools.partial(function, *args), f"call of {name}", timeout)

    def operations(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Return the body of ``GET /api/operations``: every listed operation."""
        replica = self._started()

        async def read() -> dict[str, Any]:
            return operations_response(replica)

        call = f"listing of the operations of replica {replica.replica_id!r}"
        return self._run(read, call, timeout)

    def operations_body(self, *, timeout: float | None = None) -> bytes:
        """Return `operations` encoded as JSON, cached until the mirror changes."""
        replica = self._started()

        async def read() -> bytes:
            return operations_body(replica)

        call = f"listing of the operations of replica {replica.replica_id!r}"
        return self._run(read, call, timeout)

    def job(
        self, job_id: str, *, timeout: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Return HTTP status and body for the status of one job.

        The store is read when the mirror does not hold the job, so a poll that
        arrives before the start event still finds it.
        """
        replica = self._started()
        return self._run(
            functools.partial(job_response, replica, job_id),
            f"status read of job {job_id!r}",
            timeout,
        )

    def cancel(
        self, job_id: str, *, timeout: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Request the cancel of `job_id`, whichever replica runs it.

        Returns HTTP status and body: 202 when accepted, 409 when the job already
        ended or cannot be cancelled, 404 when it is unknown, 400 for an invalid
        id and 503 when the request could not reach the owner.
        """
        replica = self._started()
        return self._run(
            functools.partial(cancel_response, replica, job_id),
            f"cancel of job {job_id!r}",
            timeout,
        )

    def health(self, *, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """Return 200 when the replica is ready and 503 otherwise, with the details.

        It starts the replica when needed. A start that fails or outlasts
        `timeout` (by default `start_timeout`) gives 503 with the error.
        """
        try:
            replica = self._started(timeout)

            async def read() -> tuple[int, dict[str, Any]]:
                return health_response(replica)

            return self._run(read, "readiness check", timeout)
        except ReplistateError as exc:
            return 503, {"ready": False, "error": str(exc)}

    def start_operation(
        self,
        cache_key: str,
        work: Work | ThreadWork,
        *,
        element_name: str = "",
        op_type: OpType = OpType.INSTALL,
        is_backend: bool = False,
        job_id: str | None = None,
        cancellable: bool = True,
        exclusive: bool = True,
        timeout: float | None = None,
    ) -> str:
        """Admit an operation owned by this process's replica; return its job id.

        `work` is either a coroutine function, run on the event loop with an
        `OperationHandle`, or a plain function, run in a daemon thread of its
        own with a `BlockingOperationHandle`. A thread cannot be interrupted, so
        a plain function learns of a cancel request through
        `BlockingOperationHandle.cancel_requested` and should return soon after.
        After a cancel request, the operation ends as cancelled once the
        function has returned or raised.

        The other arguments are those of `OperationsService.start_operation`.

        Raises:
            CallTimeoutError: the admission took longer than `timeout`. It goes
                on, so the operation may still start.
            OperationConflictError: the job id is in use, or, with `exclusive`,
                another job runs on the cache key.
            InvalidIdError: the job id cannot be used in a subject.
        """
        replica = self._started()
        if is_coroutine_function(work):
            run = cast(Work, work)
        else:
            run = in_thread(cast(ThreadWork, work), timeout or self.timeout)
        start = functools.partial(
            replica.operations.start_operation,
            cache_key,
            run,
            element_name=element_name,
            op_type=op_type,
            is_backend=is_backend,
            job_id=job_id,
            cancellable=cancellable,
            exclusive=exclusive,
        )
        return self._run(start, f"start of an operation on {cache_key!r}", timeout)


def operations_blueprint(
    prefix: str = "/api", *, name: str = "replistate"
) -> Blueprint:
    """Return a blueprint serving the operations API under `prefix`.

    - ``GET {prefix}/operations``: every operation in the OpCache;
    - ``GET {prefix}/operations/<job_id>``: the status of one job;
    - ``POST {prefix}/operations/<job_id>/cancel``: cancel a job on any replica;
    - ``GET {prefix}/ready``: 200 when the replica is ready, else 503.

    Register it on an app set up with `Replistate`. The views return 503 with
    ``{"error": ...}`` when the replica cannot be reached or started in time.

    Args:
        prefix: the URL prefix, such as ``/api``.
        name: the blueprint's name, unique within an app.
    """
    blueprint = Blueprint(name, __name__, url_prefix=prefix.rstrip("/") or None)

    def extension() -> Replistate:
        state = current_app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, _AppState):
            raise RuntimeError(
                f"the {name!r} blueprint needs replistate set up on app "
                f"{current_app.name!r}: call Replistate(app) or init_app(app)"
            )
        return state.extension

    @blueprint.get("/operations")
    def list_operations() -> Response:
        return Response(extension().operations_body(), mimetype="application/json")

    @blueprint.get("/operations/<job_id>")
    def get_job(job_id: str) -> tuple[dict[str, Any], int]:
        status, body = extension().job(job_id)
        return body, status

    @blueprint.post("/operations/<job_id>/cancel")
    def cancel_job(job_id: str) -> tuple[dict[str, Any], int]:
        status, body = extension().cancel(job_id)
        return body, status

    @blueprint.get("/ready")
    def ready() -> tuple[dict[str, Any], int]:
        status, body = extension().health()
        return body, status

    @blueprint.errorhandler(ReplistateError)
    def unavailable(exc: ReplistateError) -> tuple[dict[str, Any], int]:
        logger.warning("operations API request failed: %s", exc)
        return {"error": str(exc)}, 503

    return blueprint
