"""The message bus interface, and typed messages over any bus.

A `MessageBus` carries bytes between replicas, with the semantics of core NATS: at
most once, in order per subscription, every subscriber receives every matching
message (its own publications included), and handlers run asynchronously, never
inside the `publish` call. `Channel` puts the codec on top, so every message on
every bus, the in-memory one included, crosses it as the codec's JSON.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from replistate import codec
from replistate.errors import BusError, DecodeError, PayloadTooLargeError

__all__ = [
    "BusState",
    "Channel",
    "Handler",
    "MessageBus",
    "StateListener",
    "StateNotifier",
    "Subscription",
    "raised_by_callback",
    "validate_subject",
]

logger = logging.getLogger(__name__)

M = TypeVar("M")

Handler = Callable[[str, bytes], Awaitable[None]]
"""Called with the subject and payload of each message received."""


class BusState(enum.Enum):
    """Connection state of a bus."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


StateListener = Callable[[BusState], None]
"""Called on each change of connection state, on the event loop."""


class Subscription(Protocol):
    """A handle on one subscription."""

    @property
    def pattern(self) -> str:
        """The subject pattern subscribed to."""
        ...

    async def unsubscribe(self) -> None:
        """Remove this subscription, and only this one. Idempotent."""
        ...


class MessageBus(Protocol):
    """Transport of byte payloads on subjects, with NATS semantics."""

    @property
    def connected(self) -> bool:
        """Whether messages can be published and received now."""
        ...

    @property
    def max_payload(self) -> int:
        """The largest payload accepted, in bytes."""
        ...

    async def connect(self) -> None:
        """Connect to the bus.

        Raises:
            BusError: the bus cannot be reached.
        """
        ...

    async def publish(self, subject: str, data: bytes) -> None:
        """Publish `data` on `subject`, a subject without wildcards.

        Raises:
            BusError: the bus is closed or not connected.
            PayloadTooLargeError: `data` is over `max_payload`.
            ValueError: `subject` is empty, has an empty token or a wildcard.
        """
        ...

    async def subscribe(self, pattern: str, handler: Handler) -> Subscription:
        """Call `handler` for every message whose subject matches `pattern`.

        `*` matches one token and a final `>` the rest. An exception raised by
        the handler is logged and the subscription keeps running.
        """
        ...

    async def flush(self) -> None:
        """Wait until every message published so far has left this client."""
        ...

    async def close(self) -> None:
        """Drain the subscriptions and close the connection. Idempotent."""
        ...

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Register `listener` for state changes; return a function removing it."""
        ...


class StateNotifier:
    """Connection state of a bus and the listeners notified of its changes."""

    def __init__(self) -> None:
        self._state = BusState.DISCONNECTED
        self._listeners: list[StateListener] = []

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Register `listener` for state changes; return a function removing it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _set_state(self, state: BusState) -> None:
        if state is self._state:
            return
        self._state = state
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("bus state listener failed on %s", state.value)


def raised_by_callback(error: BaseException) -> bool:
    """Return whether `error`, caught around a user callback, is the callback's own.

    A `CancelledError` is the callback's own when the running task is not being
    cancelled, for example when a hook awaited a future that someone cancelled.
    Such an error must not end the subscription that called the hook.
    """
    if isinstance(error, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() == 0
    return isinstance(error, Exception)


@functools.lru_cache(maxsize=4096)
def validate_subject(subject: str, *, pattern: bool = False) -> str:
    """Return `subject` if NATS accepts it for publishing, or as a pattern.

    Results are cached, because the subjects of one job are published again and
    again; an invalid subject raises every time.

    Raises:
        ValueError: the subject is empty, has an empty token or whitespace, or,
            unless `pattern` is true, a wildcard. A `>` is accepted only as the
            last token of a pattern.
    """
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if not token or any(char.isspace() for char in token):
            raise ValueError(f"invalid subject {subject!r}: empty token or whitespace")
        wildcard = token in ("*", ">")
        if ("*" in token or ">" in token) and not wildcard:
            raise ValueError(f"invalid subject {subject!r}: partial wildcard {token!r}")
        if wildcard and not pattern:
            raise ValueError(
                f"invalid subject {subject!r}: wildcards are only valid in patterns"
            )
        if token == ">" and index != len(tokens) - 1:
            raise ValueError(f"invalid subject {subject!r}: '>' must be last")
    return subject


class Channel:
    """Typed messages over a `MessageBus`, through the codec.

    Undecodable payloads are dropped with a WARNING naming the subject and the
    reason, and counted in `dropped` by reason. An exception raised by a handler
    is logged and does not end the subscription.

    Args:
        bus: the transport.
        max_payload: the largest payload sent or accepted, in bytes; defaults to
            the bus's own limit.
    """

    def __init__(self, bus: MessageBus, *, max_payload: int | None = None) -> None:
        self.bus = bus
        self._max_payload = max_payload
        self.dropped: collections.Counter[str] = collections.Counter()

    @property
    def max_payload(self) -> int:
        """The payload limit in force, in bytes."""
        if self._max_payload is None:
            return self.bus.max_payload
        return min(self._max_payload, self.bus.max_payload)

    async def publish(self, subject: str, message: object) -> None:
        """Encode `message` and publish it on `subject`.

        Raises:
            EncodeError: the message cannot be encoded.
            PayloadTooLargeError: the encoded message is over `max_payload`.
            BusError: the bus is closed or unreachable.
        """
        data = codec.encode(message)
        if len(data) > self.max_payload:
            raise PayloadTooLargeError(len(data), self.max_payload, subject=subject)
        await self.bus.publish(subject, data)

    async def subscribe(
        self,
        pattern: str,
        decoder: Callable[[str, bytes, int], M],
        handler: Callable[[str, M], Awaitable[None]],
        *,
        skip_marker: bytes | None = None,
    ) -> Subscription:
        """Subscribe `handler` to the decoded messages matching `pattern`.

        Args:
            pattern: a subject pattern with NATS wildcards.
            decoder: turns subject, payload and size limit into a message, raising
                `DecodeError` or `PayloadTooLargeError` for a bad payload;
                `Channel.decoder(SomeMessage)` builds one for a single type.
            handler: called with the subject and the decoded message.
            skip_marker: payloads containing these bytes are ignored without
                being decoded. A replica passes its own origin field, so the
                messages it published itself cost no decoding.
        """

        async def receive(subject: str, data: bytes) -> None:
            if skip_marker is not None and skip_marker in data:
                return
            try:
                message = decoder(subject, data, self.max_payload)
            except PayloadTooLargeError as exc:
                self._drop(subject, "too_large", exc)
                return
            except DecodeError as exc:
                self._drop(subject, "invalid", exc)
                return
            try:
                await handler(subject, message)
            except BaseException as exc:
                if not raised_by_callback(exc):
                    raise
                logger.exception("handler for subject %r failed", subject)

        return await self.bus.subscribe(pattern, receive)

    @staticmethod
    def decoder(message_type: type[M]) -> Callable[[str, bytes, int], M]:
        """Return a decoder of payloads of one message type."""

        def decode(subject: str, data: bytes, limit: int) -> M:
            return codec.decode(data, message_type, max_size=limit, subject=subject)

        return decode

    def _drop(self, subject: str, reason: str, error: Exception) -> None:
        self.dropped[reason] += 1
        logger.warning(
            "dropped message on subject %r (%s, %d so far): %s",
            subject,
            reason,
            self.dropped[reason],
            error,
        )


def closed_error(action: str) -> BusError:
    """Return the error raised when a closed or unconnected bus is used."""
    return BusError(f"cannot {action}: the bus is not connected; call connect() first")
