"""stop() called while start() runs."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate.models import OperationRecord
from replistate.store.memory import InMemoryStore
from replistate.testing import ReplicaCluster


class SlowListStore(InMemoryStore):
    """An in-memory store whose `list_active` result arrives after a delay."""

    async def list_active(
        self, window: timedelta = timedelta(hours=1), *, include_failed: bool = False
    ) -> list[OperationRecord]:
        rows = await super().list_active(window, include_failed=include_failed)
        await asyncio.sleep(0.05)
        return rows


async def test_stop_during_start_is_ignored() -> None:
    cluster = ReplicaCluster(store=SlowListStore(), defaults={"resync_interval": None})
    replica = await cluster.add("a", start=False)
    try:
        starting = asyncio.create_task(replica.start())
        await asyncio.sleep(0.01)  # start() is hydrating
        await replica.stop()  # e.g. SIGTERM during start-up
        await starting

        # The replica was asked to stop last, so it must not run now.
        assert not replica.ready
        assert not replica.operations.runner.accepting
    finally:
        await cluster.stop()
