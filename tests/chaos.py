"""Random fault schedules over a three-replica cluster, checked for convergence.

Each schedule admits operations, reports progress, completes, fails and cancels
them from random replicas, restarts replicas, disconnects buses, injects message
faults and takes the store away. Then it heals: faults off, store back, buses
reconnected, orphans reaped, one resync. Every mirror must then equal the store
and every replica must show the same terminal states.

Run many schedules::

    python -m tests.chaos --schedules 2000 --seed 7

It ends by printing one line, ``schedules=N divergent=D``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from replistate import (
    BusError,
    InMemoryStore,
    NotStartedError,
    OperationConflictError,
    OperationHandle,
    OpStatus,
    Replica,
    StoreError,
)
from replistate.models import OperationRecord
from replistate.testing import FaultyBroker, ReplicaCluster

LEASE = timedelta(seconds=0.2)
SETTINGS: dict[str, Any] = {
    "resync_interval": None,
    "lease": LEASE,
    "reap_interval": 0.05,
    "write_interval": 0.01,
    "write_retry_max": 0.02,
    "retention": 3600.0,
    "stop_grace_period": 0.2,
}
ACTIONS = (
    "admit",
    "tick",
    "complete",
    "fail",
    "cancel",
    "restart",
    "disconnect",
    "reconnect",
    "faults",
    "calm",
    "store_down",
    "store_up",
)


class OutageStore(InMemoryStore):
    """An in-memory store that raises `StoreError` on every call while down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self, action: str) -> None:
        if self.down:
            raise StoreError(f"{action} failed: the store is down")

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        self._check("upsert_placeholder")
        await super().upsert_placeholder(record)

    async def save_status(
        self, job_id: str, status: OpStatus, *, version: int, **identity: Any
    ) -> bool:
        self._check("save_status")
        return await super().save_status(job_id, status, version=version, **identity)

    async def get(self, job_id: str) -> OperationRecord | None:
        self._check("get")
        return await super().get(job_id)

    async def list_active(
        self, window: timedelta = timedelta(hours=1), *, include_failed: bool = False
    ) -> list[OperationRecord]:
        self._check("list_active")
        return await super().list_active(window, include_failed=include_failed)

    async def renew_leases(
        self, frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> int:
        self._check("renew_leases")
        return await super().renew_leases(frontend_id, job_ids, lease)

    async def reap_orphans(self, error: str) -> list[OperationRecord]:
        self._check("reap_orphans")
        return await super().reap_orphans(error)

    async def request_cancel(self, job_id: str) -> OperationRecord | None:
        self._check("request_cancel")
        return await super().request_cancel(job_id)


@dataclass
class Control:
    """How the test steers one operation's work."""

    handle: OperationHandle | None = None
    outcome: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Schedule:
    """One cluster and the operations a schedule steers on it."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.broker = FaultyBroker(seed=seed)
        self.store = OutageStore()
        self.cluster = ReplicaCluster(
            broker=self.broker, store=self.store, defaults=SETTINGS
        )
        self.controls: dict[str, Control] = {}
        self.names = 0

    async def begin(self) -> None:
        for _ in range(3):
            await self.add_replica()

    async def add_replica(self) -> Replica:
        self.names += 1
        return await self.cluster.add(f"r{self.names}")

    def pick_replica(self) -> Replica:
        return self.random.choice(self.cluster.running)

    def pick_job(self) -> str | None:
        running = [job for job, control in self.controls.items() if not control.outcome]
        return self.random.choice(running) if running else None

    async def step(self, action: str) -> None:
        """Run one action; errors a caller would see are part of the game."""
        with contextlib.suppress(
            BusError, StoreError, NotStartedError, OperationConflictError
        ):
            await getattr(self, f"do_{action}")()
        for _ in range(3):
            await asyncio.sleep(0)

    async def do_admit(self) -> None:
        control = Control()

        async def work(handle: OperationHandle) -> None:
            control.handle = handle
            await control.done.wait()
            if control.outcome == "fail":
                raise RuntimeError("download failed: connection reset")

        key = f"gallery@model-{self.random.randrange(6)}"
        job_id = await self.pick_replica().operations.start_operation(key, work)
        self.controls[job_id] = control

    async def do_tick(self) -> None:
        job_id = self.pick_job()
        control = self.controls.get(job_id) if job_id else None
        if control is not None and control.handle is not None:
            await control.handle.update(progress=float(self.random.randrange(100)))

    async def finish(self, outcome: str) -> None:
        job_id = self.pick_job()
        if job_id is not None:
            self.controls[job_id].outcome = outcome
            self.controls[job_id].done.set()

    async def do_complete(self) -> None:
        await self.finish("complete")

    async def do_fail(self) -> None:
        await self.finish("fail")

    async def do_cancel(self) -> None:
        job_id = self.pick_job()
        if job_id is not None:
            await self.pick_replica().operations.cancel(job_id)

    async def do_restart(self) -> None:
        if len(self.cluster.running) > 1:
            await self.pick_replica().stop()
            await self.add_replica()

    async def do_disconnect(self) -> None:
        self.cluster.bus_of(self.pick_replica()).disconnect()

    async def do_reconnect(self) -> None:
        self.cluster.bus_of(self.pick_replica()).reconnect()

    async def do_faults(self) -> None:
        kind = self.random.choice(("drop", "duplicate", "reorder", "delay"))
        pattern = self.random.choice((">", "gallery.*.progress", "gallery.opcache.*"))
        rate = self.random.choice((0.2, 0.5, 1.0))
        if kind == "delay":
            self.broker.delay(pattern, seconds=0.01, rate=rate)
        else:
            getattr(self.broker, kind)(pattern, rate)

    async def do_calm(self) -> None:
        self.broker.clear()

    async def do_store_down(self) -> None:
        self.store.down = True

    async def do_store_up(self) -> None:
        self.store.down = False

    async def heal(self) -> list[str]:
        """Heal every fault, reap orphans, resync; return the divergences."""
        self.store.down = False
        self.broker.clear()
        for replica in self.cluster.running:
            self.cluster.bus_of(replica).reconnect()
        await self.cluster.settle()
        await self.cluster.flush_writes()
        # Owners lost while the store was down are reaped once their lease ends.
        await asyncio.sleep(LEASE.total_seconds() * 2)
        await self.cluster.heal()
        return self.cluster.divergences()

    async def end(self) -> None:
        for control in self.controls.values():
            control.done.set()
        await self.cluster.stop()


async def run_schedule(seed: int, steps: int = 30) -> list[str]:
    """Run one random schedule of `steps` actions; return the divergences."""
    schedule = Schedule(seed)
    await schedule.begin()
    try:
        for _ in range(steps):
            await schedule.step(schedule.random.choice(ACTIONS))
        return await schedule.heal()
    finally:
        await schedule.end()


def main(argv: list[str] | None = None) -> int:
    """Run many schedules; print ``schedules=N divergent=D``; exit 1 if D > 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=100, help="schedules to run")
    parser.add_argument("--seed", type=int, default=7, help="seed of the first one")
    parser.add_argument("--steps", type=int, default=30, help="actions per schedule")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)

    async def run_all() -> int:
        divergent = 0
        for index in range(args.schedules):
            seed = args.seed + index
            problems = await run_schedule(seed, args.steps)
            if problems:
                divergent += 1
                print(f"seed {seed}: {'; '.join(problems)}", file=sys.stderr)
        return divergent

    divergent = asyncio.run(run_all())
    print(f"schedules={args.schedules} divergent={divergent}")
    return 1 if divergent else 0


if __name__ == "__main__":
    raise SystemExit(main())
