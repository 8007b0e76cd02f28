"""Contract of every `MessageBus`, run on the in-memory bus and on real NATS."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from replistate import (
    BusError,
    BusState,
    Channel,
    InMemoryBroker,
    InMemoryBus,
    MessageBus,
)
from replistate.codec import CancelMessage, ProgressMessage, encode
from replistate.errors import PayloadTooLargeError
from replistate.models import OpStatus

from .conftest import BusFactory

TIMEOUT = 10.0


class Inbox:
    """Collects (subject, payload) pairs and lets a test wait for a count."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    async def __call__(self, subject: str, data: bytes) -> None:
        self.messages.append((subject, data))
        self._changed.set()

    async def wait_for(self, count: int) -> list[tuple[str, bytes]]:
        try:
            async with asyncio.timeout(TIMEOUT):
                while len(self.messages) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{len(self.messages)} of {count} messages within {TIMEOUT:g} s: "
                f"{self.messages!r}"
            ) from None
        return self.messages

    @property
    def subjects(self) -> list[str]:
        return [subject for subject, _ in self.messages]


async def wait_for_interest(
    publisher: MessageBus, subscriber: MessageBus, prefix: str
) -> None:
    """Wait until what `publisher` sends reaches the subscriptions of `subscriber`.

    NOTE: nats-server 2.15 was seen to drop, for a few milliseconds after the
    subscriber's flush returned, what another connection published on the new
    subscription (about 1 run in 200). A probe subscribed after the others shows
    when they are in effect.
    """
    probe = Inbox()
    await subscriber.subscribe(f"{prefix}_probe.interest", probe)
    await subscriber.flush()
    async with asyncio.timeout(TIMEOUT):
        while not probe.messages:
            await publisher.publish(f"{prefix}_probe.interest", b"probe")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await probe.wait_for(1)


async def publish_marker(bus: object, subject: str) -> None:
    """Publish a last message so a test can wait for everything before it."""
    await bus.publish(subject, b"marker")  # type: ignore[attr-defined]


async def test_delivers_to_wildcard_subscriber(
    bus_factory: BusFactory, prefix: str
) -> None:
    publisher, subscriber = await bus_factory(), await bus_factory()
    inbox = Inbox()
    await subscriber.subscribe(f"{prefix}.*.progress", inbox)
    await subscriber.flush()
    await wait_for_interest(publisher, subscriber, prefix)

    await publisher.publish(f"{prefix}.job-1.progress", b'{"a":1}')
    await publisher.publish(f"{prefix}.job-2.progress", b'{"a":2}')

    assert await inbox.wait_for(2) == [
        (f"{prefix}.job-1.progress", b'{"a":1}'),
        (f"{prefix}.job-2.progress", b'{"a":2}'),
    ]


async def test_star_matches_exactly_one_token(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    inbox = Inbox()
    await bus.subscribe(f"{prefix}.*.progress", inbox)
    marker = Inbox()
    await bus.subscribe(f"{prefix}.marker", marker)
    await bus.flush()

    await bus.publish(f"{prefix}.a.b.progress", b"two tokens")
    await bus.publish(f"{prefix}.progress", b"no token")
    await bus.publish(f"{prefix}.a.progress", b"one token")
    await publish_marker(bus, f"{prefix}.marker")

    await marker.wait_for(1)
    await inbox.wait_for(1)
    assert inbox.messages == [(f"{prefix}.a.progress", b"one token")]


async def test_greater_than_matches_the_rest(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    inbox = Inbox()
    await bus.subscribe(f"{prefix}.>", inbox)
    await bus.flush()

    await bus.publish(f"{prefix}.a", b"1")
    await bus.publish(f"{prefix}.a.b.c", b"2")

    await inbox.wait_for(2)
    assert inbox.subjects == [f"{prefix}.a", f"{prefix}.a.b.c"]


async def test_publisher_receives_own_messages(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    inbox = Inbox()
    await bus.subscribe(f"{prefix}.echo", inbox)
    await bus.flush()

    await bus.publish(f"{prefix}.echo", b"me")

    assert await inbox.wait_for(1) == [(f"{prefix}.echo", b"me")]


async def test_unsubscribe_removes_only_its_own(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    first, second = Inbox(), Inbox()
    handle = await bus.subscribe(f"{prefix}.topic", first)
    await bus.subscribe(f"{prefix}.topic", second)
    await bus.flush()

    await handle.unsubscribe()
    await handle.unsubscribe()
    await bus.publish(f"{prefix}.topic", b"after")

    await second.wait_for(1)
    assert second.messages == [(f"{prefix}.topic", b"after")]
    assert first.messages == []
    assert handle.pattern == f"{prefix}.topic"


async def test_handler_error_keeps_subscription(
    bus_factory: BusFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await bus_factory()
    inbox = Inbox()

    async def flaky(subject: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler exploded")
        await inbox(subject, data)

    await bus.subscribe(f"{prefix}.topic", flaky)
    await bus.flush()

    await bus.publish(f"{prefix}.topic", b"boom")
    await bus.publish(f"{prefix}.topic", b"fine")

    assert await inbox.wait_for(1) == [(f"{prefix}.topic", b"fine")]
    assert "handler exploded" in caplog.text


async def test_delivery_keeps_publish_order(
    bus_factory: BusFactory, prefix: str
) -> None:
    publisher, subscriber = await bus_factory(), await bus_factory()
    inbox = Inbox()
    await subscriber.subscribe(f"{prefix}.>", inbox)
    await subscriber.flush()
    await wait_for_interest(publisher, subscriber, prefix)

    for index in range(200):
        await publisher.publish(f"{prefix}.n{index % 7}", str(index).encode())

    messages = await inbox.wait_for(200)
    assert [int(data) for _, data in messages] == list(range(200))


async def test_publish_never_runs_handler_inline(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    inbox = Inbox()
    await bus.subscribe(f"{prefix}.topic", inbox)
    await bus.flush()

    await bus.publish(f"{prefix}.topic", b"x")

    assert inbox.messages == []
    await inbox.wait_for(1)


@pytest.mark.parametrize(
    "subject", ["", "a..b", "a.*", "a.>", "a b", "a.b*", ".a", "a."]
)
async def test_publish_rejects_invalid_subject(
    bus_factory: BusFactory, subject: str
) -> None:
    bus = await bus_factory()

    with pytest.raises(ValueError, match="invalid subject"):
        await bus.publish(subject, b"x")


@pytest.mark.parametrize("pattern", ["a.>.b", "a.b>", "", "a..b"])
async def test_subscribe_rejects_invalid_pattern(
    bus_factory: BusFactory, pattern: str
) -> None:
    bus = await bus_factory()

    with pytest.raises(ValueError, match="invalid subject"):
        await bus.subscribe(pattern, Inbox())


async def test_publish_rejects_oversized_payload(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()

    with pytest.raises(PayloadTooLargeError) as raised:
        await bus.publish(f"{prefix}.big", b"x" * (bus.max_payload + 1))

    assert raised.value.size == bus.max_payload + 1
    assert raised.value.limit == bus.max_payload


async def test_state_listener_sees_close(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    states: list[BusState] = []
    bus.add_state_listener(states.append)

    await bus.close()
    await bus.close()

    assert states == [BusState.CLOSED]
    assert bus.connected is False


async def test_publish_after_close_raises(bus_factory: BusFactory, prefix: str) -> None:
    bus = await bus_factory()
    await bus.close()

    with pytest.raises(BusError, match="not connected"):
        await bus.publish(f"{prefix}.topic", b"x")


async def test_close_delivers_pending_messages() -> None:
    """Closing an in-memory bus hands queued messages to handlers first, as a
    NATS drain does."""
    broker = InMemoryBroker()
    bus = broker.connect()
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe("topic", inbox)

    for index in range(10):
        await bus.publish("topic", str(index).encode())
    await bus.close()

    assert len(inbox.messages) == 10


async def test_memory_bus_requires_bytes() -> None:
    bus = InMemoryBus()
    await bus.connect()

    with pytest.raises(TypeError, match="bytes"):
        await bus.publish("topic", "text")  # type: ignore[arg-type]


async def test_memory_bus_separate_brokers_isolated() -> None:
    first, second = InMemoryBus(), InMemoryBus()
    await first.connect()
    await second.connect()
    inbox = Inbox()
    await second.subscribe("topic", inbox)

    await first.publish("topic", b"x")
    await second.drain()

    assert inbox.messages == []


async def test_nats_bus_unreachable_raises(caplog: pytest.LogCaptureFixture) -> None:
    from replistate import NatsBus
    from replistate._servers import find_free_port

    bus = NatsBus(f"nats://127.0.0.1:{find_free_port()}", connect_timeout=1)

    with pytest.raises(BusError, match="cannot connect to NATS"):
        await bus.connect()


# Channel: typed messages over any bus.


async def test_channel_round_trips_message(
    bus_factory: BusFactory, prefix: str
) -> None:
    channel = Channel(await bus_factory())
    received: list[ProgressMessage] = []
    done = asyncio.Event()

    async def handler(subject: str, message: ProgressMessage) -> None:
        received.append(message)
        done.set()

    await channel.subscribe(
        f"{prefix}.*.progress", Channel.decoder(ProgressMessage), handler
    )
    await channel.bus.flush()
    sent = ProgressMessage(
        job_id="job-1",
        status=OpStatus(progress=12.5, error=OSError("disk full")),
        origin="a",
        version=3,
    )
    await channel.publish(f"{prefix}.job-1.progress", sent)

    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    assert received == [sent]


async def test_channel_drops_malformed_and_continues(
    bus_factory: BusFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await bus_factory()
    channel = Channel(bus, max_payload=200)
    received: list[CancelMessage] = []
    done = asyncio.Event()

    async def handler(subject: str, message: CancelMessage) -> None:
        received.append(message)
        done.set()

    await channel.subscribe(
        f"{prefix}.*.cancel", Channel.decoder(CancelMessage), handler
    )
    await bus.flush()
    caplog.set_level(logging.WARNING)

    await bus.publish(f"{prefix}.j1.cancel", b"not json")
    await bus.publish(f"{prefix}.j2.cancel", b'{"id": 42}')
    await bus.publish(f"{prefix}.j3.cancel", b'{"id": "' + b"x" * 300 + b'"}')
    await bus.publish(f"{prefix}.j4.cancel", encode(CancelMessage(id="j4")))

    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    assert [message.id for message in received] == ["j4"]
    assert channel.dropped["invalid"] == 2
    assert channel.dropped["too_large"] == 1
    assert f"{prefix}.j1.cancel" in caplog.text
    assert f"{prefix}.j3.cancel" in caplog.text
    assert "(invalid, 1 so far): payload is not JSON" in caplog.text
    assert "(invalid, 2 so far): invalid CancelMessage" in caplog.text
    assert "(too_large, 1 so far)" in caplog.text


async def test_channel_rejects_oversized_publish(
    bus_factory: BusFactory, prefix: str
) -> None:
    channel = Channel(await bus_factory(), max_payload=100)
    message = ProgressMessage(job_id="j", status=OpStatus(message="x" * 200))

    with pytest.raises(PayloadTooLargeError) as raised:
        await channel.publish(f"{prefix}.j.progress", message)

    assert raised.value.limit == 100
    assert raised.value.subject == f"{prefix}.j.progress"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("reconnect_wait", "outage"),
    [
        pytest.param(0.1, 0.0, id="restart"),
        # nats-py gives up after 60 attempts by default. Refused connections
        # fail at once, so 3 s at 0.02 s apart makes well over 60 attempts.
        pytest.param(0.02, 3.0, id="past-60-attempts"),
    ],
)
async def test_nats_bus_survives_server_restart(
    reconnect_wait: float, outage: float
) -> None:
    """The client reconnects on its own, however many attempts it takes, and
    its subscriptions deliver again."""
    from replistate import NatsBus
    from replistate._servers import ThrowawayNats

    with ThrowawayNats() as server:
        bus = NatsBus(server.url, reconnect_wait=reconnect_wait, echo=True)
        await bus.connect()
        states: list[BusState] = []
        changed = asyncio.Event()

        def on_state(state: BusState) -> None:
            states.append(state)
            changed.set()

        bus.add_state_listener(on_state)
        inbox = Inbox()
        await bus.subscribe("restart.topic", inbox)
        await bus.flush()

        await asyncio.to_thread(server.stop)
        async with asyncio.timeout(20):
            while BusState.DISCONNECTED not in states:
                changed.clear()
                await changed.wait()
        assert bus.connected is False
        await asyncio.sleep(outage)
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(20):
            while states[-1] is not BusState.CONNECTED:
                changed.clear()
                await changed.wait()
        await bus.publish("restart.topic", b"after restart")

        assert await inbox.wait_for(1) == [("restart.topic", b"after restart")]
        assert states == [BusState.DISCONNECTED, BusState.CONNECTED]
        await bus.close()


async def test_channel_skips_marked_payloads(
    bus_factory: BusFactory, prefix: str
) -> None:
    bus = await bus_factory()
    channel = Channel(bus)
    received: list[str] = []

    async def handler(subject: str, message: CancelMessage) -> None:
        received.append(message.origin or "")

    await channel.subscribe(
        f"{prefix}.*.cancel",
        Channel.decoder(CancelMessage),
        handler,
        skip_marker=b'"origin":"self"',
    )
    await bus.flush()

    for origin in ("self", "peer", "selfish"):
        await channel.publish(
            f"{prefix}.job-1.cancel", CancelMessage(id="job-1", origin=origin)
        )
    # One subscription gets its messages in order, so "selfish", published
    # last, arrives after "self" was skipped.
    async with asyncio.timeout(TIMEOUT):
        while len(received) < 2:  # noqa: ASYNC110 - the handler sets no event
            await asyncio.sleep(0.01)

    assert received == ["peer", "selfish"]


async def test_without_echo_publisher_misses_own(
    bus_factory: BusFactory, prefix: str
) -> None:
    quiet = await bus_factory(echo=False)
    peer = await bus_factory()
    own, peers = Inbox(), Inbox()
    await quiet.subscribe(f"{prefix}.topic", own)
    await peer.subscribe(f"{prefix}.topic", peers)
    await quiet.flush()
    await peer.flush()
    await wait_for_interest(quiet, peer, prefix)
    await wait_for_interest(peer, quiet, prefix)

    await quiet.publish(f"{prefix}.topic", b"from quiet")
    await peer.publish(f"{prefix}.topic", b"from peer")

    # Two connections publish, so the order the server delivers them in is open.
    assert sorted(await peers.wait_for(2)) == [
        (f"{prefix}.topic", b"from peer"),
        (f"{prefix}.topic", b"from quiet"),
    ]
    assert await own.wait_for(1) == [(f"{prefix}.topic", b"from peer")]


async def test_nats_bus_closes_before_connect(nats_url: str) -> None:
    from replistate import NatsBus

    bus = NatsBus(nats_url)

    await bus.close()

    assert bus.connected is False


async def test_start_reports_store_error_with_nats(nats_url: str, prefix: str) -> None:
    from replistate import NatsBus, PostgresGalleryStore, Replica, ReplicaConfig
    from replistate._servers import find_free_port
    from replistate.errors import StoreError

    closed_port = find_free_port()
    replica = Replica(
        ReplicaConfig(subject_prefix=prefix),
        bus=NatsBus(nats_url),
        store=PostgresGalleryStore(
            f"postgresql://postgres@127.0.0.1:{closed_port}/none", timeout=1.0
        ),
    )

    with pytest.raises(StoreError, match=str(closed_port)):
        await replica.start()


async def test_nats_connect_error_names_reason() -> None:
    from replistate import NatsBus
    from replistate._servers import find_free_port

    bus = NatsBus(f"nats://127.0.0.1:{find_free_port()}", connect_timeout=1)

    with pytest.raises(BusError) as caught:
        await bus.connect()

    assert "()" not in str(caught.value)
    assert "within 1 s (" in str(caught.value)
    await bus.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://user:secret@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
        ("nats://secret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("nats://user:se@cret@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
        (
            "nats://a:secret@127.0.0.1:1, nats://secret@127.0.0.1:2",
            "nats://a:***@127.0.0.1:1,nats://***@127.0.0.1:2",
        ),
    ],
)
def test_safe_url_hides_credentials(url: str, shown: str) -> None:
    from replistate.bus.nats import safe_url

    assert safe_url(url) == shown
