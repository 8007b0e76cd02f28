"""The fault-injecting broker and the replica cluster of `replistate.testing`."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from replistate import OpStatus
from replistate.testing import FaultyBroker, ReplicaCluster

from .chaos import ACTIONS, Schedule


class Inbox:
    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def __call__(self, subject: str, data: bytes) -> None:
        self.payloads.append(data)


async def connected(broker: FaultyBroker) -> tuple[object, Inbox]:
    bus = broker.connect()
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe("topic.>", inbox)
    return bus, inbox


async def publish_all(bus: object, count: int, subject: str = "topic.a") -> None:
    for index in range(count):
        await bus.publish(subject, str(index).encode())  # type: ignore[attr-defined]
    await bus.drain()  # type: ignore[attr-defined]


async def test_drop_on_chosen_subject() -> None:
    broker = FaultyBroker(seed=1)
    bus, inbox = await connected(broker)
    broker.drop("topic.a")

    await bus.publish("topic.a", b"lost")  # type: ignore[attr-defined]
    await bus.publish("topic.b", b"kept")  # type: ignore[attr-defined]
    await bus.drain()  # type: ignore[attr-defined]

    assert inbox.payloads == [b"kept"]
    assert broker.counts["drop"] == 1


async def test_duplicate_delivers_twice() -> None:
    broker = FaultyBroker(seed=1)
    bus, inbox = await connected(broker)
    broker.duplicate()

    await publish_all(bus, 2)

    assert inbox.payloads == [b"0", b"0", b"1", b"1"]


async def test_reorder_swaps_neighbours() -> None:
    broker = FaultyBroker(seed=1)
    bus, inbox = await connected(broker)
    broker.reorder(rate=1.0)

    await publish_all(bus, 4)
    broker.release()
    await bus.drain()  # type: ignore[attr-defined]

    assert inbox.payloads == [b"1", b"0", b"3", b"2"]


async def test_delay_holds_then_delivers() -> None:
    broker = FaultyBroker(seed=1)
    bus, inbox = await connected(broker)
    broker.delay(seconds=0.05)

    await publish_all(bus, 1)
    assert inbox.payloads == []
    await broker.wait_delays()
    await bus.drain()  # type: ignore[attr-defined]

    assert inbox.payloads == [b"0"]


async def test_random_faults_repeat_with_seed() -> None:
    async def run(seed: int) -> list[bytes]:
        broker = FaultyBroker(seed=seed)
        bus, inbox = await connected(broker)
        broker.drop(rate=0.5)
        await publish_all(bus, 50)
        return inbox.payloads

    first, second = await run(42), await run(42)

    assert first == second
    assert 0 < len(first) < 50


async def test_disconnected_bus_misses_messages() -> None:
    broker = FaultyBroker()
    sender, _ = await connected(broker)
    receiver, inbox = await connected(broker)

    receiver.disconnect()  # type: ignore[attr-defined]
    await sender.publish("topic.a", b"missed")  # type: ignore[attr-defined]
    receiver.reconnect()  # type: ignore[attr-defined]
    await sender.publish("topic.a", b"seen")  # type: ignore[attr-defined]
    await receiver.drain()  # type: ignore[attr-defined]

    assert inbox.payloads == [b"seen"]


async def test_cluster_heals_dropped_progress() -> None:
    cluster = ReplicaCluster(broker=FaultyBroker(seed=3))
    a = await cluster.add("a")
    b = await cluster.add("b")
    assert isinstance(cluster.broker, FaultyBroker)
    await a.operations.update_status("running", OpStatus(progress=10))
    await cluster.settle()
    cluster.broker.drop("gallery.*.progress")

    await a.operations.update_status("running", OpStatus(processed=True))
    await a.operations.update_status("unseen", OpStatus(progress=30))
    await cluster.settle()
    assert b.operations.get_status("unseen") is None

    await cluster.heal()

    ended = b.operations.get_status("running")
    unseen = b.operations.get_status("unseen")
    assert ended is not None
    assert ended.processed is True
    assert unseen is not None
    assert unseen.progress == 30
    assert cluster.divergences() == []
    await cluster.stop()


@pytest.mark.parametrize("seed", range(5))
async def test_chaos_schedule_converges(seed: int) -> None:
    from .chaos import run_schedule

    assert await run_schedule(seed) == []


class ConvergenceMachine(RuleBasedStateMachine):
    """Random interleavings of the chaos actions on three replicas.

    After healing and one resync, every mirror equals the store and every
    replica shows the same terminal states.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.schedule = Schedule(seed=0)
        self.loop.run_until_complete(self.schedule.begin())

    @rule(action=st.sampled_from(ACTIONS), choice=st.integers(0, 2**32 - 1))
    def act(self, action: str, choice: int) -> None:
        self.schedule.random.seed(choice)
        self.loop.run_until_complete(self.schedule.step(action))

    @invariant()
    def replicas_keep_running(self) -> None:
        assert len(self.schedule.cluster.running) >= 1

    def teardown(self) -> None:
        try:
            problems = self.loop.run_until_complete(self.schedule.heal())
            assert problems == []
        finally:
            self.loop.run_until_complete(self.schedule.end())
            self.loop.close()


ConvergenceMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_convergence = ConvergenceMachine.TestCase
