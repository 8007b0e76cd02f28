"""A replica's periodic duties: leases, orphans, cancel intents and retention.

The owner of an operation renews a lease on its row on its own timer, whatever the
work is doing, so a long silent phase never looks like death. Every replica reaps
on a period: the store ends each job whose lease expired, in one conditional
update, so when several replicas reap at once each orphan is ended by one of them,
which publishes the result. A job with a stored cancel request ends cancelled, any
other fails with an error naming the lost owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from replistate._background import BackgroundTask
from replistate.errors import StoreError
from replistate.models import OperationRecord, OpState
from replistate.service import OperationsService
from replistate.store.base import GalleryStore

__all__ = ["ORPHAN_ERROR", "Housekeeper"]

logger = logging.getLogger(__name__)

ORPHAN_ERROR = (
    "owner replica {owner} was lost: its lease expired before the operation finished"
)
"""Error of a job whose owner stopped renewing its lease; `{owner}` is its id."""


class Housekeeper:
    """Runs lease renewal, orphan reaping and retention on their periods.

    Args:
        replica_id: this replica's id, the owner named on its rows.
        operations: the replica's statuses and owned operations.
        store: the durable store, or None in standalone mode, where only the
            retention runs.
        lease: how long a renewed lease lasts; it is renewed every third of it.
        reap_interval: seconds between two searches for orphans.
        retention: seconds a terminal job stays in memory.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        operations: OperationsService,
        store: GalleryStore | None,
        lease: timedelta,
        reap_interval: float,
        retention: float,
    ) -> None:
        self.replica_id = replica_id
        self.operations = operations
        self.store = store
        self.lease = lease
        self.reap_interval = reap_interval
        self.retention = retention
        self.reaped = 0
        self._loop = BackgroundTask("replistate housekeeping", self._run)

    def start(self) -> None:
        """Start the background task."""
        self._loop.start()

    async def stop(self) -> None:
        """Stop the background task."""
        await self._loop.stop()

    async def renew(self) -> int:
        """Renew the leases of the jobs this replica runs; return how many."""
        owned = self.operations.owned_jobs
        if self.store is None or not owned:
            return 0
        return await self.store.renew_leases(self.replica_id, owned, self.lease)

    async def lease_job(self, job_id: str) -> None:
        """Give a newly admitted job its first lease at once.

        Without it, an owner that dies before its first renewal would leave a
        job that no reaper ever ends. A failure is logged and the next periodic
        renewal tries again.
        """
        if self.store is None:
            return
        try:
            await self.store.renew_leases(self.replica_id, [job_id], self.lease)
        except StoreError as exc:
            logger.warning("first lease of job %r not stored: %s", job_id, exc)

    async def reap(self) -> list[OperationRecord]:
        """End the jobs whose owner's lease expired; return those this call ended.

        Each is held and published with a version above any seen, and a cancelled
        one leaves the OpCache as a live cancel would.
        """
        if self.store is None:
            return []
        rows = await self.store.reap_orphans(ORPHAN_ERROR)
        for row in rows:
            self.reaped += 1
            logger.warning(
                "job %r of lost owner %r ended as %s",
                row.id,
                row.frontend_id,
                row.status.value,
            )
            await self.operations.adopt_stored(row)
            if row.status is OpState.CANCELLED:
                await self.operations.opcache.delete_job(
                    row.id, version=self.operations.version_of(row.id)
                )
        return rows

    async def check_cancel_intents(self) -> int:
        """Cancel the owned jobs whose cancel request is stored; return how many.

        A cancel message lost while this replica was disconnected, or dropped by
        the bus, is found this way: it runs after each reconnect and on every
        reap period.
        """
        owned = self.operations.owned_jobs
        if self.store is None or not owned:
            return 0
        cancelled = 0
        for row in await self.store.get_many(owned):
            if row.cancel_requested and row.id in self.operations.owned_jobs:
                logger.info("stored cancel request found for job %r", row.id)
                await self.operations.cancel_owned(row.id)
                cancelled += 1
        return cancelled

    async def _run(self) -> None:
        renew_every = self.lease.total_seconds() / 3
        tick = min(1.0, renew_every, self.reap_interval)
        last_renew = last_reap = time.monotonic()
        store_failed_at = -float("inf")
        leased: set[str] = set()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            self.operations.prune(self.retention)
            try:
                owned = set(self.operations.owned_jobs)
                # A new job gets its first lease at the next tick, not a period on.
                if now - last_renew >= renew_every or owned - leased:
                    last_renew = now
                    await self.renew()
                    leased = owned
                if now - last_reap >= self.reap_interval:
                    last_reap = now
                    await self.check_cancel_intents()
                    # Owners could not renew while the store was down: give them
                    # a whole lease after it returns before taking them as lost.
                    if now - store_failed_at >= self.lease.total_seconds():
                        await self.reap()
            except StoreError as exc:
                store_failed_at = time.monotonic()
                logger.warning("lease renewal or reaping failed: %s", exc)
