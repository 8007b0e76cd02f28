"""Resync: repair a replica's mirror from the store after it may have missed events.

A replica misses bus messages while it is disconnected, and a jump in the versions
of a job shows that some were lost on the way. A resync reads the store, which every
writer updates, and repairs the mirror:

- active rows are applied under the version rules, and their OpCache entries put
  back;
- a job held as running that the store reports terminal takes the stored state,
  and fires the hooks a live end event would: an install that completed while the
  replica was away reloads its models;
- a job held as running that the store no longer lists, because it was cleaned up
  or went stale, is dropped, so nothing shows running forever;
- a job held as terminal that the store still lists as running is written to the
  store, because the replica that ended it may have lost the write. The store's
  conditional update still decides between two terminal states.

`Resyncer` runs one resync at a time: requests made during a run cause one more
run after it, never several.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from replistate._background import BackgroundTask
from replistate.codec import InvalidationMessage
from replistate.errors import StoreError
from replistate.models import OperationRecord, OpState, OpStatus
from replistate.opcache import OpCache, OpCacheEntry
from replistate.service import OperationsService
from replistate.store.base import GalleryStore

__all__ = ["Resyncer"]

logger = logging.getLogger(__name__)


FORGET_GRACE = 10.0
"""Seconds a job must stay unchanged before a resync drops it for missing from the
store. Its owner writes the first row a store round trip after announcing the job,
and later when the store is slow."""


REPLAY_MARGIN = 1.0
"""Seconds before the previous resync from which completions have their hooks
checked again, for an end seen while that resync ran."""


class Resyncer:
    """Reconciles one replica's mirror with the store, on request and on a period.

    Args:
        store: the durable store.
        operations: the replica's statuses.
        opcache: the replica's OpCache.
        active_window: how recently a row must have been updated to be active.
        interval: seconds between periodic resyncs; None for none.
    """

    def __init__(
        self,
        *,
        store: GalleryStore,
        operations: OperationsService,
        opcache: OpCache,
        active_window: timedelta,
        interval: float | None,
    ) -> None:
        self.store = store
        self.operations = operations
        self.opcache = opcache
        self.active_window = active_window
        self.interval = interval
        self.forget_grace = FORGET_GRACE
        """Seconds a job must stay unchanged before a resync may drop it."""
        self.runs = 0
        self.failures = 0
        self._requested = asyncio.Event()
        self._reasons: set[str] = set()
        self._ended_since: float | None = None
        self._last_began: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = BackgroundTask("replistate resync", self._run)

    def start(self) -> None:
        """Start the background task that runs requested and periodic resyncs."""
        self._loop.start()

    async def stop(self) -> None:
        """Stop the background task; a resync under way is abandoned."""
        await self._loop.stop()
        self._idle.set()

    def request(self, reason: str, *, ended_since: float | None = None) -> None:
        """Ask for a resync soon; `reason` is logged with it.

        With `ended_since`, a `time.monotonic()` value, the resync also runs the
        invalidation hooks of jobs seen completing since then; see `resync`.
        """
        if ended_since is not None:
            self._ended_since = min(self._ended_since or ended_since, ended_since)
        self._reasons.add(reason)
        self._idle.clear()
        self._requested.set()

    async def wait_idle(self) -> None:
        """Wait until no resync is requested or running."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self._requested.wait()
            except TimeoutError:
                self._reasons.add("period")
            self._requested.clear()
            reasons, self._reasons = self._reasons, set()
            ended_since, self._ended_since = self._ended_since, None
            if self._last_began is not None:
                # An invalidation can be lost without a disconnect, as NATS drops
                # messages for a slow consumer, so every resync runs the hooks of
                # jobs seen completing since the last one, once per version.
                since = self._last_began - REPLAY_MARGIN
                ended_since = since if ended_since is None else min(ended_since, since)
            began = time.monotonic()
            try:
                await self.resync(", ".join(sorted(reasons)), ended_since=ended_since)
            except StoreError as exc:
                if ended_since is not None:
                    self._ended_since = min(
                        self._ended_since or ended_since, ended_since
                    )
                self.failures += 1
                logger.warning("resync failed, will retry: %s", exc)
                await asyncio.sleep(1.0)
                self.request("retry")
                continue
            self._last_began = began
            if not self._requested.is_set():
                self._idle.set()

    async def resync(
        self, reason: str = "request", *, ended_since: float | None = None
    ) -> int:
        """Reconcile the mirror with the store now; return how many jobs changed.

        Args:
            reason: logged with the result.
            ended_since: a `time.monotonic()` value. The hooks of jobs this replica
                saw completing since then run again, deduplicated by version,
                because around a reconnect the status of a job and its
                invalidation can arrive on either side of the resubscription.

        Raises:
            StoreError: the store cannot be read; the mirror is left as it was.
        """
        began = time.perf_counter()
        # Only jobs held before the read can be judged by it: a job admitted while
        # the query ran is missing from its rows without being gone.
        held_before = self.operations.statuses()
        rows = await self.store.list_active(self.active_window, include_failed=True)
        changed = 0
        active = {row.id for row in rows}
        for row in rows:
            held_status = self.operations.get_status(row.id)
            if (
                held_status is not None
                and held_status.terminal
                and not row.status.terminal
            ):
                # The store missed the end, for example because the owner
                # stopped while the store was down, but this replica has it.
                await self.operations.repair(row.id)
                changed += 1
            elif self.operations.restore(
                row.id,
                row.to_status(),
                row.version,
                final=row.status.terminal,
                updated_at=row.updated_at,
            ):
                changed += 1
            if row.cache_key and self.operations.get_status(row.id) is not None:
                self.opcache.restore(
                    OpCacheEntry(row.cache_key, row.id, row.is_backend_op)
                )

        owned = set(self.operations.owned_jobs)
        for job_id, status in held_before.items():
            current = self.operations.get_status(job_id)
            if job_id in active or job_id in owned or status.terminal:
                # The owner knows its own jobs better than a stale row does.
                continue
            if current is None or current.terminal:
                continue
            writer = self.operations.writer
            if writer is not None and writer.is_pending(job_id):
                # A change this replica made, which the store does not have yet.
                continue
            stored = await self.store.get(job_id)
            if (
                stored is not None
                and not stored.status.terminal
                and self._recent(stored)
            ):
                # Written after the list was read, so still active.
                if self.operations.restore(job_id, stored.to_status(), stored.version):
                    changed += 1
                continue
            if stored is None or not stored.status.terminal:
                changed_at = self.operations.changed_at(job_id)
                if (
                    changed_at is not None
                    and time.monotonic() - changed_at < self.forget_grace
                ):
                    # A peer's job that changed moments ago may not be stored yet.
                    continue
                # Cleaned up, or not updated within the window: taken as gone.
                self.operations.forget(job_id)
                self.opcache.discard(job_id)
                changed += 1
                logger.info("job %r is no longer active: dropped by resync", job_id)
                continue
            if self.operations.restore(
                job_id,
                stored.to_status(),
                stored.version,
                final=True,
                updated_at=stored.updated_at,
            ):
                changed += 1
                await self._ended(stored)

        changed += await self._check_ended(held_before, active)
        if ended_since is not None:
            await self._replay_hooks(ended_since)

        for entry in self.opcache.entries():
            held_status = self.operations.get_status(entry.job_id)
            if (
                entry.job_id not in active
                and held_status is not None
                and held_status.terminal
            ):
                # A failure that left the active window stops being listed.
                self.opcache.discard(entry.job_id)
                changed += 1

        self.runs += 1
        logger.info(
            "resynced (%s): %d active rows, %d jobs changed in %.1f ms",
            reason,
            len(rows),
            changed,
            (time.perf_counter() - began) * 1000,
        )
        return changed

    def _recent(self, row: OperationRecord) -> bool:
        """Return whether `row` counts as active by the rule of `list_active`."""
        now = datetime.now(UTC)
        if row.lease_expires_at is not None and row.lease_expires_at > now:
            return True
        return row.updated_at is not None and row.updated_at >= now - self.active_window

    async def _check_ended(
        self, held_before: dict[str, OpStatus], active: set[str]
    ) -> int:
        """Align the terminal states held here with those the store decided.

        A replica that missed the message of an overruled end, such as a
        completion that lost to the reaper, still shows the state it saw.
        """
        ended = [
            job_id
            for job_id, status in held_before.items()
            if status.terminal and job_id not in active
        ]
        changed = 0
        for start in range(0, len(ended), 500):
            for row in await self.store.get_many(ended[start : start + 500]):
                held = self.operations.get_status(row.id)
                if (
                    held is not None
                    and row.status.terminal
                    and held.state is not row.status
                    and self.operations.restore(
                        row.id, row.to_status(), row.version, final=True
                    )
                ):
                    changed += 1
        return changed

    async def _replay_hooks(self, since: float) -> None:
        """Run, once per version, the hooks of jobs that completed since `since`."""
        recent = self.operations.completed_since(since)
        for start in range(0, len(recent), 500):
            for row in await self.store.get_many(recent[start : start + 500]):
                # A job pruned while the rows were read has had its seen
                # invalidations forgotten, so replaying it would run them again.
                held = self.operations.get_status(row.id)
                if row.status is OpState.COMPLETED and held is not None:
                    await self._invalidate_for(row)

    async def _ended(self, row: OperationRecord) -> None:
        """Do what a live end event would have done for a job found terminal."""
        logger.info("job %r found %s by resync", row.id, row.status.value)
        if row.status is OpState.FAILED:
            # A failure stays listed with its error, as it does on live replicas.
            return
        self.opcache.discard(row.id)
        if row.status is OpState.COMPLETED:
            await self._invalidate_for(row)

    async def _invalidate_for(self, row: OperationRecord) -> None:
        """Run the hooks the invalidation of a completed job runs."""
        subjects = self.operations.subjects
        subject = (
            subjects.invalidate_backends
            if row.is_backend_op
            else subjects.invalidate_models
        )
        message = InvalidationMessage(
            element=row.gallery_element_name or None,
            op=row.op_type,
            origin=row.frontend_id or None,
            job_id=row.id,
            version=row.version,
        )
        await self.operations.invalidations.handle_invalidation(subject, message)
