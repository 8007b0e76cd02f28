"""Write-behind of statuses to the store: coalesced, retried, never blocking readers.

A replica hands every status it writes to a `StoreWriter` and goes on. Progress
writes of one operation are coalesced, so the latest wins and the store sees at most
one write per interval. Start and terminal writes skip the interval. A write that
fails is kept and retried with capped exponential backoff, so a terminal status
reaches the store once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from replistate._background import BackgroundTask
from replistate.errors import StoreError
from replistate.models import OperationRecord, OpStatus, OpType
from replistate.store.base import GalleryStore

__all__ = ["PendingWrite", "StoreWriter"]

logger = logging.getLogger(__name__)

RejectedCallback = Callable[[str, OperationRecord | None], Awaitable[None]]
"""Called with the job id and the stored row when a terminal write lost a race."""


@attrs.frozen
class PendingWrite:
    """The latest status of one job that the store has not taken yet."""

    job_id: str
    status: OpStatus
    version: int
    frontend_id: str
    urgent: bool
    cache_key: str = ""
    is_backend_op: bool = False
    op_type: OpType | None = None


class StoreWriter:
    """Coalescing, retrying writer of statuses to a `GalleryStore`.

    Args:
        store: where the statuses go.
        interval: seconds between two progress writes of one job.
        max_backoff: maximum wait between retries after a failure, in seconds.
        on_rejected: called when a terminal write did not apply, which means
            another terminal state won the race in the store.
    """

    def __init__(
        self,
        store: GalleryStore,
        *,
        interval: float = 0.5,
        max_backoff: float = 5.0,
        on_rejected: RejectedCallback | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.max_backoff = max_backoff
        self.on_rejected = on_rejected
        self.writes = 0
        self.failures = 0
        self.retry_wait = 0.0
        """Seconds the writer waits before its next retry, 0 while writes succeed."""
        self._pending: dict[str, PendingWrite] = {}
        self._last_write: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = BackgroundTask("replistate writer", self._run)

    @property
    def pending(self) -> dict[str, PendingWrite]:
        """A copy of the writes not yet taken by the store, by job id."""
        return dict(self._pending)

    def is_pending(self, job_id: str) -> bool:
        """Return whether a status of `job_id` waits to be written."""
        return job_id in self._pending

    def start(self) -> None:
        """Start the background task that writes."""
        self._loop.start()

    def submit(
        self,
        job_id: str,
        status: OpStatus,
        *,
        version: int,
        frontend_id: str = "",
        urgent: bool = False,
        cache_key: str = "",
        is_backend_op: bool = False,
        op_type: OpType | None = None,
    ) -> None:
        """Queue `status` for the store, replacing any older pending write.

        `urgent` writes (start and terminal states) skip the coalescing interval.
        A write that is already urgent stays urgent when a newer status replaces it.
        `cache_key`, `is_backend_op` and `op_type` go to the store with the status,
        so a lost placeholder write is made good; see `GalleryStore.save_status`.
        """
        held = self._pending.get(job_id)
        if held is not None and held.version > version:
            return
        urgent = urgent or status.terminal or (held is not None and held.urgent)
        self._pending[job_id] = PendingWrite(
            job_id,
            status,
            version,
            frontend_id,
            urgent,
            cache_key,
            is_backend_op,
            op_type,
        )
        self._idle.clear()
        if held is None or urgent:
            # A replaced write keeps its due time, which the writer waits for
            # already; waking it for every progress tick would cost a task switch.
            self._wake.set()

    async def flush(self) -> None:
        """Wait until every pending write is stored.

        While the store is down this waits until it is back; wrap the call in
        `asyncio.timeout` to bound it.
        """
        await self._idle.wait()

    async def stop(self, grace_period: float = 5.0) -> None:
        """Write what is pending, waiting up to `grace_period` seconds, then stop."""
        for write in list(self._pending.values()):
            self._pending[write.job_id] = attrs.evolve(write, urgent=True)
        self._wake.set()
        try:
            async with asyncio.timeout(grace_period):
                await self.flush()
        except TimeoutError:
            logger.warning(
                "stopped with %d writes not stored: jobs %s",
                len(self._pending),
                ", ".join(sorted(self._pending)),
            )
        await self._loop.stop()

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            due, wait = self._due_writes()
            if not due:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            failed = False
            for write in due:
                # Every due write is tried, so one the store keeps rejecting does
                # not hold back the writes of other jobs.
                if not await self._write(write):
                    failed = True
            if failed:
                backoff = min(self.max_backoff, max(0.05, backoff * 2))
                self.retry_wait = backoff
                await asyncio.sleep(backoff)
            else:
                backoff = self.retry_wait = 0.0

    def _due_writes(self) -> tuple[list[PendingWrite], float]:
        now = time.monotonic()
        due: list[PendingWrite] = []
        wait = self.interval
        for write in self._pending.values():
            ready_at = self._last_write.get(write.job_id, 0.0) + self.interval
            if write.urgent or ready_at <= now:
                due.append(write)
            else:
                wait = min(wait, ready_at - now)
        due.sort(key=lambda write: not write.urgent)
        return due, wait

    async def _write(self, write: PendingWrite) -> bool:
        try:
            applied = await self.store.save_status(
                write.job_id,
                write.status,
                version=write.version,
                frontend_id=write.frontend_id,
                cache_key=write.cache_key,
                is_backend_op=write.is_backend_op,
                op_type=write.op_type,
            )
        except StoreError as exc:
            self.failures += 1
            logger.warning(
                "status version %d of job %r not stored, will retry: %s",
                write.version,
                write.job_id,
                exc,
            )
            return False
        self.writes += 1
        self._last_write[write.job_id] = time.monotonic()
        if self._pending.get(write.job_id) == write:
            del self._pending[write.job_id]
        if write.status.terminal:
            self._last_write.pop(write.job_id, None)
        if not applied and write.status.terminal and self.on_rejected is not None:
            try:
                stored = await self.store.get(write.job_id)
            except StoreError as exc:
                logger.warning(
                    "terminal write of job %r lost a race and the winner could "
                    "not be read: %s",
                    write.job_id,
                    exc,
                )
                stored = None
            try:
                await self.on_rejected(write.job_id, stored)
            except Exception:
                logger.exception(
                    "handling of the rejected write of job %r failed", write.job_id
                )
        return True
