"""The message bus on NATS, through nats-py.

The client reconnects without limit: a replica outlives any NATS outage, and the
state listeners tell the replica when the connection drops and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSubscription

from replistate.bus.base import (
    BusState,
    Handler,
    StateNotifier,
    closed_error,
    raised_by_callback,
    validate_subject,
)
from replistate.errors import BusError, PayloadTooLargeError

__all__ = ["NatsBus", "safe_url"]

logger = logging.getLogger(__name__)


def safe_url(url: str) -> str:
    """Return the NATS server list `url` with every password or token hidden.

    ``nats://user:secret@host:4222`` becomes ``nats://user:***@host:4222`` and
    ``nats://token@host:4222`` becomes ``nats://***@host:4222``.
    """
    servers = []
    for server in url.split(","):
        scheme, separator, rest = server.strip().partition("://")
        if not separator:
            scheme, rest = "", scheme
        # The authority ends at the first "/" after the last "@".
        credentials, at, host = rest.rpartition("@")
        if at:
            user, colon, _ = credentials.partition(":")
            rest = f"{user}:***@{host}" if colon else f"***@{host}"
        servers.append(f"{scheme}{separator}{rest}")
    return ",".join(servers)


class _Subscription:
    def __init__(self, pattern: str, subscription: _NatsSubscription) -> None:
        self._pattern = pattern
        self._subscription = subscription
        self._active = True

    @property
    def pattern(self) -> str:
        return self._pattern

    async def unsubscribe(self) -> None:
        if not self._active:
            return
        self._active = False
        # Closing the connection may already have removed the subscription.
        with contextlib.suppress(
            nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError
        ):
            await self._subscription.unsubscribe()


class NatsBus(StateNotifier):
    """A `MessageBus` on a NATS server.

    Args:
        url: the server URL, such as ``nats://127.0.0.1:4222``; several may be
            given separated by commas.
        name: the client name shown by the server's monitoring.
        connect_timeout: seconds the first connection may take before `connect`
            raises `BusError`.
        reconnect_wait: seconds between reconnection attempts.
        echo: whether this client's own subscriptions receive what it
            publishes. A replica ignores its own messages and runs its own
            invalidation hooks itself, so the default is no echo, which spares
            the server and the client a copy of every message.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        reconnect_wait: float = 0.5,
        echo: bool = False,
    ) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        """`url` without passwords or tokens, for messages and logs."""
        self.echo = echo
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self._client = Client()
        super().__init__()
        self._subscriptions: list[_Subscription] = []
        self._closing = False
        # nats-py asserts when a client that never connected is closed.
        self._connected_once = False

    @property
    def connected(self) -> bool:
        return self._client.is_connected

    @property
    def max_payload(self) -> int:
        return self._client.max_payload

    async def connect(self) -> None:
        if self._client.is_connected:
            return
        if self._client.is_closed:
            # A closed client cannot connect again; a retried start needs a new one.
            self._client = Client()
            self._closing = False
        servers = [server.strip() for server in self.url.split(",")]
        try:
            await asyncio.wait_for(
                self._client.connect(
                    servers=servers,
                    name=self.name,
                    allow_reconnect=True,
                    no_echo=not self.echo,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=min(2, int(self.connect_timeout) or 1),
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                timeout=self.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await self._client.close()
            raise BusError(
                f"cannot connect to NATS at {self.safe_url} within "
                f"{self.connect_timeout:g} s ({str(exc) or type(exc).__name__}); check "
                "that nats-server runs there"
            ) from None
        self._connected_once = True
        logger.info("connected to NATS at %s", self.safe_url)
        self._set_state(BusState.CONNECTED)

    async def publish(self, subject: str, data: bytes) -> None:
        validate_subject(subject)
        if len(data) > self._client.max_payload > 0:
            raise PayloadTooLargeError(
                len(data), self._client.max_payload, subject=subject
            )
        try:
            await self._client.publish(subject, data)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            raise closed_error(f"publish on {subject!r}") from None
        except nats.errors.OutboundBufferLimitError as exc:
            raise BusError(
                f"cannot publish on {subject!r} while disconnected: {exc}"
            ) from None

    async def subscribe(self, pattern: str, handler: Handler) -> _Subscription:
        validate_subject(pattern, pattern=True)

        async def receive(msg: Msg) -> None:
            try:
                await handler(msg.subject, msg.data)
            except BaseException as exc:
                if not raised_by_callback(exc):
                    raise
                logger.exception("handler for subject %r failed", msg.subject)

        try:
            subscription = await self._client.subscribe(pattern, cb=receive)
        except nats.errors.ConnectionClosedError:
            raise closed_error(f"subscribe to {pattern!r}") from None
        handle = _Subscription(pattern, subscription)
        self._subscriptions.append(handle)
        return handle

    async def flush(self) -> None:
        try:
            await self._client.flush()
        except (nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError):
            raise closed_error("flush") from None

    async def close(self) -> None:
        if not self._connected_once:
            # A connect cancelled midway may have opened a socket and started
            # tasks, which must end here. nats-py asserts on closing a client
            # whose connect never completed.
            with contextlib.suppress(AssertionError, nats.errors.Error):
                await self._client.close()
            self._set_state(BusState.CLOSED)
            return
        if self._client.is_closed:
            return
        self._closing = True
        if self._client.is_connected:
            try:
                await self._client.drain()
            except (nats.errors.Error, TimeoutError) as exc:
                logger.warning("drain of NATS connection failed: %s", exc)
        await self._client.close()
        self._set_state(BusState.CLOSED)

    async def _on_error(self, error: Any) -> None:
        logger.warning("NATS client error: %s", str(error) or type(error).__name__)

    async def _on_disconnected(self) -> None:
        if self._closing:
            # The client reports a disconnect on every close, too.
            return
        if self._state is BusState.CONNECTED:
            logger.warning("disconnected from NATS at %s, reconnecting", self.safe_url)
        self._set_state(BusState.DISCONNECTED)

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s", self.safe_url)
        self._set_state(BusState.CONNECTED)

    async def _on_closed(self) -> None:
        self._set_state(BusState.CLOSED)
