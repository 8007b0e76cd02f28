"""Tools for testing code that uses replistate: a faulty bus and a replica cluster.

`FaultyBroker` is an `InMemoryBroker` whose deliveries can be dropped, duplicated,
reordered or delayed, on chosen subjects or at random with a seed, so a test can
show that an application converges after the faults a real bus has. Each
connection it makes can be disconnected and reconnected. `ReplicaCluster` runs
several replicas in one event loop on one broker and one store, and waits until
they have handled every message.

Example::

    cluster = ReplicaCluster(broker=FaultyBroker(seed=7))
    a = await cluster.add("a")
    b = await cluster.add("b")
    cluster.broker.drop("gallery.*.progress", rate=0.5)
    ...
    await cluster.heal()
    assert cluster.divergences() == []
    await cluster.stop()
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import attrs

from replistate._servers import ThrowawayNats, ThrowawayPostgres
from replistate.bus.memory import (
    InMemoryBroker,
    InMemoryBus,
    _MemorySubscription,
    receives,
)
from replistate.replica import Replica, ReplicaConfig
from replistate.store.base import GalleryStore
from replistate.store.memory import InMemoryStore
from replistate.subjects import subject_matches

__all__ = [
    "Fault",
    "FaultyBroker",
    "ReplicaCluster",
    "ThrowawayNats",
    "ThrowawayPostgres",
]


@attrs.frozen
class Fault:
    """A fault applied to deliveries whose subject matches `pattern`.

    Attributes:
        kind: ``drop``, ``duplicate``, ``reorder`` or ``delay``.
        pattern: a subject pattern with NATS wildcards.
        rate: the probability, from 0 to 1, that a matching delivery is hit.
        seconds: for ``delay``, how long a hit delivery waits.
    """

    kind: str = attrs.field(
        validator=attrs.validators.in_(("drop", "duplicate", "reorder", "delay"))
    )
    pattern: str = ">"
    rate: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    seconds: float = 0.0


class FaultyBroker(InMemoryBroker):
    """An in-memory broker that injects faults into deliveries.

    Faults act per subscription: a message published once may reach one
    subscriber twice and another not at all, as on a real network. Reordering
    keeps a message back until the next one for the same subscription passes it.

    Args:
        seed: seeds the random choices, so a failing schedule can be replayed.
        max_payload: the largest payload accepted, in bytes.
    """

    def __init__(
        self, *, seed: int | None = None, max_payload: int = 1024 * 1024
    ) -> None:
        super().__init__(max_payload=max_payload)
        self.random = random.Random(seed)
        self.faults: list[Fault] = []
        self.counts: dict[str, int] = {
            "drop": 0,
            "duplicate": 0,
            "reorder": 0,
            "delay": 0,
        }
        self._held: dict[int, tuple[_MemorySubscription, str, bytes]] = {}
        self._delayed: set[asyncio.TimerHandle] = set()
        self._delays_done: asyncio.Event | None = None

    def drop(self, pattern: str = ">", rate: float = 1.0) -> None:
        """Drop deliveries on `pattern` with probability `rate`."""
        self.faults.append(Fault("drop", pattern, rate))

    def duplicate(self, pattern: str = ">", rate: float = 1.0) -> None:
        """Deliver twice with probability `rate`."""
        self.faults.append(Fault("duplicate", pattern, rate))

    def reorder(self, pattern: str = ">", rate: float = 1.0) -> None:
        """Hold a delivery back behind the next one with probability `rate`."""
        self.faults.append(Fault("reorder", pattern, rate))

    def delay(
        self, pattern: str = ">", seconds: float = 0.05, rate: float = 1.0
    ) -> None:
        """Delay deliveries by `seconds` with probability `rate`."""
        self.faults.append(Fault("delay", pattern, rate, seconds))

    def clear(self) -> None:
        """Remove every fault and deliver what reordering still holds back."""
        self.faults.clear()
        self.release()

    def release(self) -> None:
        """Deliver every message that reordering holds back."""
        held, self._held = self._held, {}
        for subscription, subject, data in held.values():
            if subscription.bus.connected:
                subscription.deliver(subject, data)

    @property
    def pending_delays(self) -> int:
        """How many delayed deliveries have not happened yet."""
        return len(self._delayed)

    async def wait_delays(self) -> None:
        """Wait until every delayed delivery has happened."""
        while self._delayed:
            self._delays_done = asyncio.Event()
            await self._delays_done.wait()

    def _route(self, subject: str, data: bytes, sender: InMemoryBus) -> None:
        for subscription in list(self._subscriptions):
            if receives(subscription, subject, sender):
                self._deliver(subscription, subject, data)

    def _hit(self, kind: str, subject: str) -> Fault | None:
        for fault in self.faults:
            if (
                fault.kind == kind
                and subject_matches(fault.pattern, subject)
                and self.random.random() < fault.rate
            ):
                self.counts[kind] += 1
                return fault
        return None

    def _deliver(
        self, subscription: _MemorySubscription, subject: str, data: bytes
    ) -> None:
        if self._hit("drop", subject):
            return
        copies = 2 if self._hit("duplicate", subject) else 1
        delay = self._hit("delay", subject)
        for _ in range(copies):
            if delay is not None:
                self._deliver_later(subscription, subject, data, delay.seconds)
            elif self._hit("reorder", subject) and id(subscription) not in self._held:
                self._held[id(subscription)] = (subscription, subject, data)
            else:
                subscription.deliver(subject, data)
                held = self._held.pop(id(subscription), None)
                if held is not None:
                    subscription.deliver(held[1], held[2])

    def _deliver_later(
        self,
        subscription: _MemorySubscription,
        subject: str,
        data: bytes,
        seconds: float,
    ) -> None:
        loop = asyncio.get_running_loop()

        def deliver() -> None:
            self._delayed.discard(handle)
            if subscription.bus.connected:
                subscription.deliver(subject, data)
            if not self._delayed and self._delays_done is not None:
                self._delays_done.set()

        handle = loop.call_later(seconds, deliver)
        self._delayed.add(handle)


@attrs.define
class ReplicaCluster:
    """Replicas of one application in one event loop, on one broker and store.

    Attributes:
        broker: the shared bus medium; a `FaultyBroker` to inject faults.
        store: the shared store.
        replicas: the replicas added, stopped ones included.
        defaults: settings applied to every replica's `ReplicaConfig`.
    """

    broker: InMemoryBroker = attrs.field(factory=InMemoryBroker)
    store: GalleryStore = attrs.field(factory=InMemoryStore)
    replicas: list[Replica] = attrs.field(factory=list)
    defaults: dict[str, Any] = attrs.field(factory=dict)

    async def add(
        self, replica_id: str, *, start: bool = True, **settings: Any
    ) -> Replica:
        """Create a replica on the shared broker and store, started by default."""
        config = ReplicaConfig(replica_id=replica_id, **{**self.defaults, **settings})
        replica = Replica(config, bus=self.broker.connect(), store=self.store)
        self.replicas.append(replica)
        if start:
            await replica.start()
        return replica

    @property
    def running(self) -> list[Replica]:
        """The replicas that are started."""
        return [replica for replica in self.replicas if replica._started]

    def bus_of(self, replica: Replica) -> InMemoryBus:
        """Return the in-memory bus of `replica`."""
        assert isinstance(replica.bus, InMemoryBus)
        return replica.bus

    async def settle(self, rounds: int = 5) -> None:
        """Wait until every replica handled every message published so far.

        Delayed deliveries are waited for. Store writes are not: see
        `flush_writes`.
        """
        for _ in range(rounds):
            if isinstance(self.broker, FaultyBroker):
                await self.broker.wait_delays()
            for replica in self.running:
                bus = self.bus_of(replica)
                if bus.connected:
                    await bus.drain()
            await asyncio.sleep(0)

    async def flush_writes(self, seconds: float = 5.0) -> None:
        """Wait until every running replica's writes reached the store."""
        for replica in self.running:
            writer = replica.operations.writer
            if writer is not None:
                async with asyncio.timeout(seconds):
                    await writer.flush()

    async def heal(self) -> None:
        """Remove faults, reconnect every bus, then flush, resync and settle."""
        if isinstance(self.broker, FaultyBroker):
            self.broker.clear()
        for replica in self.running:
            self.bus_of(replica).reconnect()
        await self.settle()
        await self.flush_writes()
        for replica in self.running:
            await replica.resync()
        await self.settle()

    def divergences(self) -> list[str]:
        """Describe every way a running replica's mirror differs from the store.

        Only meaningful after `heal`. A job counts when both the store and the
        replica contain it, or when the store lists it as active.
        """
        assert isinstance(self.store, InMemoryStore), "needs the in-memory store"
        problems = []
        for replica in self.running:
            statuses = replica.operations.statuses()
            for job_id, row in self.store.rows.items():
                held = statuses.get(job_id)
                if held is None:
                    if not row.status.terminal:
                        problems.append(
                            f"{replica.replica_id} lacks active job {job_id}"
                        )
                    continue
                if held.state is not row.status and (
                    held.terminal or row.status.terminal
                ):
                    problems.append(
                        f"{replica.replica_id} shows job {job_id} {held.state.value}, "
                        f"the store {row.status.value}"
                    )
        return problems

    async def stop(self) -> None:
        """Stop every replica."""
        for replica in self.replicas:
            await replica.stop()
