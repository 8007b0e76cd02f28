"""Operation work written as a plain function, run in a thread of its own.

Flask code is not asyncio, so its work functions block. Each runs in a daemon
thread and reports progress through a `BlockingOperationHandle`, whose calls wait
on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

from replistate.integrations._loop_thread import wait_on_loop
from replistate.models import NodeProgress, OpStatus
from replistate.runner import OperationHandle, Work

__all__ = [
    "BlockingOperationHandle",
    "ThreadWork",
    "in_thread",
    "is_coroutine_function",
]

ThreadWork = Callable[["BlockingOperationHandle"], object]
"""Work of an operation written as a plain function, run in a thread of its own."""


def is_coroutine_function(function: object) -> bool:
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
        return wait_on_loop(
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
        return wait_on_loop(
            self._loop,
            self._loop_thread_id,
            functools.partial(self._handle.node, node),
            f"node update of job {self.job_id!r}",
            self._timeout,
        )


def in_thread(work: ThreadWork, timeout: float) -> Work:
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
            while not ended.done():
                # A later cancel, such as a second click or a stored intent
                # checked again, must not end the operation before its thread.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(ended)
            raise
        if error is not None:
            raise error

    return run
