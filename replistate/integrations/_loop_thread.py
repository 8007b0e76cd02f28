"""An asyncio event loop on a thread of its own, and blocking calls into it.

Code that is not asyncio, such as a Flask view, reaches a replica through these
calls: each one runs a coroutine function on the loop and waits for its result at
most a given time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from replistate.errors import CallTimeoutError

__all__ = ["LOOP_STOP_TIMEOUT", "EventLoopThread", "check_timeout", "wait_on_loop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_STOP_TIMEOUT = 5.0
"""Seconds the tasks left on the event loop at interpreter exit get to end once
cancelled."""


def check_timeout(timeout: float, name: str) -> float:
    if not timeout > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {timeout}")
    return timeout


def wait_on_loop(
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
    check_timeout(timeout, "timeout")
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


class EventLoopThread:
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
        """Run `function()` on the loop; see `wait_on_loop`."""
        return wait_on_loop(
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
