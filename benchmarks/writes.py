"""How many store writes one install with many progress ticks costs.

One replica runs an install that reports `ticks` progress updates spread over a
few seconds, and every write to PostgreSQL is counted. The baseline is what the
original Go design does: one write per tick, plus the placeholder and the end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs

from benchmarks.common import Scope, Servers, make_replica, table_dropped
from replistate import OperationHandle, PostgresGalleryStore


class CountingStore(PostgresGalleryStore):
    """A PostgreSQL store that counts the writes of operation statuses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    async def upsert_placeholder(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1
        await super().upsert_placeholder(*args, **kwargs)

    async def save_status(self, *args: Any, **kwargs: Any) -> bool:
        self.writes += 1
        return await super().save_status(*args, **kwargs)


@attrs.frozen
class Writes:
    """Store writes of one install, by replistate and by the baseline."""

    ticks: int
    seconds: float
    replistate: int
    baseline: int

    @property
    def reduction(self) -> float:
        """How many times fewer writes replistate made."""
        return self.baseline / self.replistate


async def measure(servers: Servers, ticks: int, seconds: float) -> Writes:
    """Run one install of `ticks` ticks over `seconds` and count its writes."""
    scope = Scope.new()
    store = CountingStore(servers.postgres_url, table=scope.table)
    replica = make_replica(servers, scope, "bench-writes", bus=False, store=store)
    pause = seconds / ticks
    done = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        for tick in range(1, ticks + 1):
            await handle.update(progress=100 * tick / ticks, message=f"tick {tick}")
            await asyncio.sleep(pause)
        done.set()

    async with table_dropped(servers, scope), replica:
        before = store.writes
        await replica.operations.start_operation("gallery@model-a", install)
        await done.wait()
        assert replica.operations.writer is not None
        await replica.operations.writer.flush()
        written = store.writes - before
    # The Go design writes the placeholder, each tick, and the end.
    return Writes(ticks, seconds, written, ticks + 2)
