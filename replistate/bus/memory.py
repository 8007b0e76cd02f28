"""An in-process message bus with the semantics of core NATS, for tests.

Several `InMemoryBus` connections share one `InMemoryBroker`, as several clients
share one nats-server. The bus carries only bytes, so every message crosses it as
codec output. Subjects are matched by NATS rules, payloads over the limit are
rejected, and each subscription delivers in order from its own task, so a
publisher is never re-entered by a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from replistate.bus.base import (
    BusState,
    Handler,
    StateNotifier,
    closed_error,
    raised_by_callback,
    validate_subject,
)
from replistate.codec import DEFAULT_MAX_PAYLOAD
from replistate.errors import PayloadTooLargeError
from replistate.subjects import subject_matches

__all__ = ["InMemoryBroker", "InMemoryBus"]

logger = logging.getLogger(__name__)


class InMemoryBroker:
    """The shared medium of a set of `InMemoryBus` connections.

    Args:
        max_payload: the largest payload accepted, in bytes, as the server's
            `max_payload` setting.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._subscriptions: list[_MemorySubscription] = []

    def connect(self, *, echo: bool = True) -> InMemoryBus:
        """Return a new, not yet connected, bus on this broker; see `InMemoryBus`
        for `echo`."""
        return InMemoryBus(self, echo=echo)

    def _route(self, subject: str, data: bytes, sender: InMemoryBus) -> None:
        for subscription in list(self._subscriptions):
            if receives(subscription, subject, sender):
                subscription.deliver(subject, data)


def receives(
    subscription: _MemorySubscription, subject: str, sender: InMemoryBus
) -> bool:
    """Return whether `subscription` gets a message `sender` published on
    `subject`."""
    bus = subscription.bus
    # A disconnected client misses messages, as on core NATS.
    return (
        bus.connected
        and (bus.echo or bus is not sender)
        and subject_matches(subscription.pattern, subject)
    )


class _MemorySubscription:
    def __init__(
        self, broker: InMemoryBroker, bus: InMemoryBus, pattern: str, handler: Handler
    ) -> None:
        self._broker = broker
        self._bus = bus
        self._pattern = pattern
        self._handler = handler
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"in-memory sub {pattern}")

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def bus(self) -> InMemoryBus:
        return self._bus

    def deliver(self, subject: str, data: bytes) -> None:
        self._queue.put_nowait((subject, data))

    async def _run(self) -> None:
        while True:
            subject, data = await self._queue.get()
            try:
                await self._handler(subject, data)
            except BaseException as exc:
                if not raised_by_callback(exc):
                    raise
                logger.exception("handler for subject %r failed", subject)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        await self._queue.join()

    async def unsubscribe(self) -> None:
        with contextlib.suppress(ValueError):
            self._broker._subscriptions.remove(self)
        with contextlib.suppress(ValueError):
            self._bus._subscriptions.remove(self)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class InMemoryBus(StateNotifier):
    """One client connection to an `InMemoryBroker`.

    Args:
        broker: the shared medium; a private one is made when omitted.
        echo: whether this client's own subscriptions receive what it
            publishes, as NATS does unless the client connects with no echo.
    """

    def __init__(
        self, broker: InMemoryBroker | None = None, *, echo: bool = True
    ) -> None:
        self.broker = broker if broker is not None else InMemoryBroker()
        self.echo = echo
        super().__init__()
        self._subscriptions: list[_MemorySubscription] = []

    @property
    def connected(self) -> bool:
        return self._state is BusState.CONNECTED

    @property
    def max_payload(self) -> int:
        return self.broker.max_payload

    async def connect(self) -> None:
        self._set_state(BusState.CONNECTED)

    def disconnect(self) -> None:
        """Lose the connection: publishing raises and messages are missed.

        Subscriptions survive and deliver again after `reconnect`, as nats-py
        restores them when it reconnects.
        """
        if self._state is BusState.CONNECTED:
            self._set_state(BusState.DISCONNECTED)

    def reconnect(self) -> None:
        """Restore a connection lost with `disconnect`."""
        if self._state is BusState.DISCONNECTED:
            self._set_state(BusState.CONNECTED)

    async def publish(self, subject: str, data: bytes) -> None:
        if not self.connected:
            raise closed_error(f"publish on {subject!r}")
        if not isinstance(data, bytes):
            raise TypeError(f"payload must be bytes, got {type(data).__name__}")
        validate_subject(subject)
        if len(data) > self.max_payload:
            raise PayloadTooLargeError(len(data), self.max_payload, subject=subject)
        self.broker._route(subject, data, self)

    async def subscribe(self, pattern: str, handler: Handler) -> _MemorySubscription:
        if not self.connected:
            raise closed_error(f"subscribe to {pattern!r}")
        validate_subject(pattern, pattern=True)
        subscription = _MemorySubscription(self.broker, self, pattern, handler)
        self.broker._subscriptions.append(subscription)
        self._subscriptions.append(subscription)
        return subscription

    async def flush(self) -> None:
        if not self.connected:
            raise closed_error("flush")
        # Let the broker's routing finish, as a PING round trip does on NATS.
        await asyncio.sleep(0)

    async def drain(self) -> None:
        """Wait until every subscription of this bus has handled what it has."""
        for subscription in list(self._subscriptions):
            await subscription.drain()

    async def close(self) -> None:
        if self._state is BusState.CLOSED:
            return
        for subscription in list(self._subscriptions):
            await subscription.drain()
            await subscription.unsubscribe()
        self._set_state(BusState.CLOSED)
