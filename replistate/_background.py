"""The background task of a replica component, started and stopped with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class BackgroundTask:
    """One long-running loop, restartable, whose unexpected end is logged.

    Args:
        name: the task name, shown in logs and by asyncio.
        run: makes the coroutine of the loop.
    """

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the loop runs now."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop unless it runs already."""
        if not self.running:
            self._task = asyncio.create_task(self._run(), name=self.name)
            self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Cancel the loop and wait until it ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A loop that dies would stop leases, resyncs or writes without a
            # trace, so its error is logged where the operator looks.
            logger.error("%s stopped on an error", self.name, exc_info=task.exception())
