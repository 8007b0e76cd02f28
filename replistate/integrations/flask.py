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
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, has_app_context

from replistate.errors import CallTimeoutError, ReplistateError
from replistate.integrations.api import (
    cancel_response,
    health_response,
    job_response,
    operations_body,
    operations_response,
)
from replistate.models import NodeProgress, OpStatus, OpType
from replistate.replica import Replica
from replistate.runner import OperationHandle, Work

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

LOOP_STOP_TIMEOUT = 5.0
"""Seconds the tasks left on the event loop at interpreter exit get to end once
cancelled."""

ThreadWork = Callable[["BlockingOperationHandle"], object]
"""Work of an operation written as a plain function, run in a thread of its own."""


def _check_timeout(timeout: float, name: str) -> float:
    if not timeout > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {timeout}")
    return timeout


def _wait_on_loop(
    loop: asyncio.AbstractEventLoop,
    loop_thread_id: int | None,
    function: Callable[[], Awaitable[T]],
    call: str,
    timeout: float,
    *,
    cancel_on_timeout: bool = True,
) -> T:
    """Run `function()` on `loop` and wait for its result at most `timeout` s.

    `function` is called on the loop thread, so whatever it touches before its
    first await runs there too.

    Raises:
        CallTimeoutError: the call did not finish in time. It is cancelled unless
            `cancel_on_timeout` is false.
        RuntimeError: the caller is the loop thread, where waiting would deadlock.
    """
    _check_timeout(timeout, "timeout")
    if threading.get_ident() == loop_thread_id:
        raise RuntimeError(
            f"{call} blocks, so it cannot run on the replistate event loop thread: "
            "await the coroutine there instead"
        )

    async def run() -> T:
        return await function()

    coroutine = run()
    try:
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    except RuntimeError:
        coroutine.close()
        raise
    try:
        done, _ = concurrent.futures.wait([future], timeout)
    except BaseException:
        # Interrupted while waiting, by KeyboardInterrupt for example.
        if cancel_on_timeout:
            future.cancel()
        raise
    if not done:
        if cancel_on_timeout:
            future.cancel()
        raise CallTimeoutError(call, timeout)
    # A TimeoutError raised by the call itself comes out here unchanged.
    return future.result()


class _EventLoopThread:
    """An asyncio event loop running in a daemon thread of this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self._run, name="replistate-event-loop", daemon=True
        )
        self.thread.start()
        logger.info("replistate event loop thread started in process %d", self.pid)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self._cancel_tasks())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    async def _cancel_tasks(self) -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=LOOP_STOP_TIMEOUT)

    def run(
        self,
        function: Callable[[], Awaitable[T]],
        call: str,
        timeout: float,
        *,
        cancel_on_timeout: bool = True,
    ) -> T:
        """Run `function()` on the loop; see `_wait_on_loop`."""
        return _wait_on_loop(
            self.loop,
            self.thread.ident,
            function,
            call,
            timeout,
            cancel_on_timeout=cancel_on_timeout,
        )

    def stop(self, timeout: float) -> None:
        """Stop the loop, cancel what still runs on it and close it."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if self.thread.is_alive():
            logger.warning(
                "replistate event loop thread still running %.1f s after its stop",
                timeout,
            )

    def abandon(self) -> None:
        """Make the copy inherited by a forked child inert, touching nothing that
        the parent shares.

        The loop's epoll instance, its wake-up socket pair and every connection
        are shared with the parent. Closing them here, or letting a finalizer
        unregister a socket from that epoll instance, would break the parent's
        loop. Marked closed, the loop skips every selector call, and tasks that
        can never run here are dropped without an error report.
        """
        self.loop._closed = True  # type: ignore[attr-defined]
        self.loop.set_exception_handler(lambda loop, context: None)


_lock = threading.Lock()
_loop_thread: _EventLoopThread | None = None
_app_states: weakref.WeakSet[_AppState] = weakref.WeakSet()
# Copies a forked child inherited from its parent, kept referenced so that no
# finalizer runs on them while the child lives.
_inherited: list[object] = []


def _current_loop_thread() -> _EventLoopThread:
    """Return the event-loop thread of this process, starting it if needed."""
    global _loop_thread
    if _loop_thread is not None and _loop_thread.pid != os.getpid():
        # Forked without the fork handler, by a C extension for example.
        _forget_parent()
    with _lock:
        if _loop_thread is None:
            _loop_thread = _EventLoopThread()
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
        self.timeout = _check_timeout(timeout, "timeout")
        self.start_timeout = _check_timeout(start_timeout, "start_timeout")
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
        if _is_coroutine_function(work):
            run = cast(Work, work)
        else:
            run = _in_thread(cast(ThreadWork, work), timeout or self.timeout)
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


def _is_coroutine_function(function: object) -> bool:
    # An object whose __call__ is an async def method counts too.
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        type(function).__call__
    )


class BlockingOperationHandle:
    """Progress reporter given to operation work that runs in a thread.

    It offers the methods of `OperationHandle` as blocking calls, each waiting for
    the event loop at most the timeout of the call that started the operation.

    Attributes:
        job_id: the operation's job id.
        cache_key: the OpCache key it acts on.
        element_name: the gallery element it acts on.
        op_type: install, delete or upgrade.
    """

    def __init__(
        self, handle: OperationHandle, loop: asyncio.AbstractEventLoop, timeout: float
    ) -> None:
        self._handle = handle
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        self._timeout = timeout
        self._cancel_event = threading.Event()
        self.job_id = handle.job_id
        self.cache_key = handle.cache_key
        self.element_name = handle.element_name
        self.op_type = handle.op_type

    @property
    def status(self) -> OpStatus:
        """The status held for this operation."""
        return self._handle.status

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel, or the stop of the replica, was requested."""
        return self._cancel_event.is_set()

    def wait_for_cancel(self, timeout: float | None = None) -> bool:
        """Block until a cancel is requested or `timeout` seconds passed; return
        whether one was requested. A sleep that a cancel interrupts."""
        return self._cancel_event.wait(timeout)

    def update(self, **changes: Any) -> bool:
        """Write the held status with `changes` applied, such as ``progress=42.0``.

        Returns whether it applied. It does not once the operation is terminal,
        or once the event loop of this process is closed.

        Raises:
            CallTimeoutError: the event loop did not write it in time.
        """
        if self._loop.is_closed():
            return False
        return _wait_on_loop(
            self._loop,
            self._loop_thread_id,
            functools.partial(self._handle.update, **changes),
            f"status update of job {self.job_id!r}",
            self._timeout,
        )

    def node(self, node: NodeProgress) -> OpStatus:
        """Write one node's progress, merged by the rules of `OpStatus.with_node`.

        Raises:
            CallTimeoutError: the event loop did not write it in time.
        """
        if self._loop.is_closed():
            return self.status
        return _wait_on_loop(
            self._loop,
            self._loop_thread_id,
            functools.partial(self._handle.node, node),
            f"node update of job {self.job_id!r}",
            self._timeout,
        )


def _in_thread(work: ThreadWork, timeout: float) -> Work:
    """Wrap a plain work function into one the runner awaits."""

    async def run(handle: OperationHandle) -> None:
        loop = asyncio.get_running_loop()
        blocking = BlockingOperationHandle(handle, loop, timeout)
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def report(error: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(error)

        def target() -> None:
            error: BaseException | None = None
            try:
                result = work(blocking)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(
                        "the work function returned an awaitable: define it with "
                        "async def to run it on the event loop"
                    )
            except BaseException as exc:
                error = exc
            # A loop closed at exit raises: the runner already left the operation.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(report, error)

        thread = threading.Thread(
            target=target, name=f"replistate-job-{handle.job_id}", daemon=True
        )
        thread.start()
        try:
            error = await asyncio.shield(ended)
        except asyncio.CancelledError:
            # The thread cannot be interrupted, so the work learns of the request
            # through the handle and returns.
            blocking._cancel_event.set()
            await ended
            raise
        if error is not None:
            raise error

    return run


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
