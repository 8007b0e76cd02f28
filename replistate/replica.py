"""The replica: one process's view of every operation, wired to bus and store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from replistate import codec
from replistate.bus.base import (
    BusState,
    Channel,
    MessageBus,
    Subscription,
    raised_by_callback,
)
from replistate.codec import (
    CancelMessage,
    InvalidationMessage,
    OpCacheEndMessage,
    OpCacheStartMessage,
    ProgressMessage,
    SyncRequestMessage,
)
from replistate.config import ReplicaConfig
from replistate.errors import (
    BusError,
    CodecError,
    DecodeError,
    InvalidIdError,
    NotStartedError,
)
from replistate.housekeeping import Housekeeper
from replistate.invalidation import InvalidationHook
from replistate.models import OpType
from replistate.opcache import OpCache, OpCacheEntry
from replistate.resync import Resyncer
from replistate.service import OperationsService
from replistate.store.base import GalleryStore
from replistate.subjects import (
    Subjects,
    validate_job_id,
)

__all__ = ["Replica", "ReplicaConfig"]

logger = logging.getLogger(__name__)


RECONNECT_HOOK_MARGIN = 5.0
"""Seconds before a bus loss whose completions have their hooks checked again."""


def _opcache_decoder(
    subjects: Subjects,
) -> Callable[[str, bytes, int], OpCacheStartMessage | OpCacheEndMessage]:
    def decode(
        subject: str, data: bytes, limit: int
    ) -> OpCacheStartMessage | OpCacheEndMessage:
        message: OpCacheStartMessage | OpCacheEndMessage
        if subject == subjects.opcache_start:
            message = codec.decode(
                data, OpCacheStartMessage, max_size=limit, subject=subject
            )
        elif subject == subjects.opcache_end:
            message = codec.decode(
                data, OpCacheEndMessage, max_size=limit, subject=subject
            )
        else:
            raise DecodeError(f"unknown OpCache subject {subject!r}", subject=subject)
        # Unlike progress and cancel, these subjects do not carry the job id, so
        # nothing else checked that it could name a job.
        try:
            validate_job_id(message.job_id)
        except InvalidIdError as exc:
            raise DecodeError(str(exc), subject=subject) from None
        return message

    return decode


class Replica:
    """The mirror of every operation in one process, kept in sync with its peers.

    With neither bus nor store, the replica runs standalone: the same API serves a
    single process.

    Args:
        config: the settings; defaults apply when omitted.
        bus: the message bus shared with the peers.
        store: the durable store shared with the peers.
    """

    def __init__(
        self,
        config: ReplicaConfig | None = None,
        *,
        bus: MessageBus | None = None,
        store: GalleryStore | None = None,
    ) -> None:
        self.config = config or ReplicaConfig()
        self.bus = bus
        self.store = store
        self.subjects = Subjects(self.config.subject_prefix, self.config.cache_prefix)
        self.channel = (
            Channel(bus, max_payload=self.config.max_payload) if bus else None
        )
        self.opcache = OpCache(
            replica_id=self.config.replica_id,
            subjects=self.subjects,
            channel=self.channel,
            store=store,
        )
        self.operations = OperationsService(
            replica_id=self.config.replica_id,
            subjects=self.subjects,
            opcache=self.opcache,
            channel=self.channel,
            store=store,
            write_interval=self.config.write_interval,
            write_retry_max=self.config.write_retry_max,
            history_size=self.config.history_size,
            retention=self.config.retention,
        )
        self.housekeeper = Housekeeper(
            replica_id=self.config.replica_id,
            operations=self.operations,
            store=store,
            lease=self.config.lease,
            reap_interval=self.config.reap_interval,
            retention=self.config.retention,
        )
        self.operations.runner.on_admitted = self.housekeeper.lease_job
        self._background: set[asyncio.Task[Any]] = set()
        self.resyncer = (
            Resyncer(
                store=store,
                operations=self.operations,
                opcache=self.opcache,
                active_window=self.config.active_window,
                interval=self.config.resync_interval,
            )
            if store is not None and bus is not None
            else None
        )
        self._bus_lost = False
        self._bus_lost_at = 0.0
        self._subscriptions: list[Subscription] = []
        self._remove_listener: Callable[[], None] | None = None
        self._hydrated = False
        self._started = False
        self._starting = False
        self._stop_requested = False
        # Messages received while hydrating, applied once the store was read.
        self._buffer: list[tuple[Callable[[str, Any], Awaitable[None]], str, Any]] = []
        self._buffering = False
        # Running jobs read by the last hydrate whose owner has not sent their
        # current status since, and the event set once none is left.
        self._awaiting_owners: set[str] = set()
        self._owners_answered = asyncio.Event()

    @property
    def replica_id(self) -> str:
        """This replica's id."""
        return self.config.replica_id

    @property
    def ready(self) -> bool:
        """Whether the first hydrate is done and the bus is connected."""
        if not (self._started and self._hydrated):
            return False
        return self.bus is None or self.bus.connected

    async def start(self) -> None:
        """Connect, subscribe, hydrate from the store, then apply what arrived.

        Messages received while the store is read wait in a buffer and are applied
        after the rows, so a change published during start-up is never lost, and
        the version rules keep the newer of a row and a message. When start-up
        fails, what was opened is closed again, so `start` can be retried.

        Raises:
            BusError: the bus cannot be reached.
            StoreError: the store cannot be reached.
        """
        if self._started or self._starting:
            return
        began = time.perf_counter()
        self._starting = True
        self._stop_requested = False
        try:
            count = await self._open()
        except BaseException:
            await self._close()
            raise
        finally:
            self._starting = False
        if self._stop_requested:
            # stop() was called while starting: honour it now.
            await self._close()
            logger.info("replica %r stopped while starting", self.replica_id)
            return
        self._started = True
        self.operations.runner.accepting = True
        logger.info(
            "replica %r started: hydrated %d operations in %.1f ms",
            self.replica_id,
            count,
            (time.perf_counter() - began) * 1000,
        )

    async def stop(self) -> None:
        """Stop owned work, unsubscribe, drain and close bus and store.

        Operations this replica runs are marked failed, so no peer shows them
        running forever. Called while `start` runs, it makes `start` close what
        it opened and return without starting.
        """
        if self._starting:
            self._stop_requested = True
            # Start-up no longer needs the owners' statuses.
            self._owners_answered.set()
            return
        if not self._started:
            return
        self._started = False
        await self.operations.stop_operations(
            f"owner replica {self.replica_id} stopped before the operation finished",
            self.config.stop_grace_period,
        )
        await self._close()
        logger.info("replica %r stopped", self.replica_id)

    async def _open(self) -> int:
        opened_at = time.monotonic()
        if self.store is not None:
            await self.store.open()
            if self.config.create_schema:
                await self.store.ensure_schema()
        if self.operations.writer is not None:
            self.operations.writer.start()
        self._buffering = True
        if self.bus is not None and self.channel is not None:
            await self.bus.connect()
            self._remove_listener = self.bus.add_state_listener(self._on_bus_state)
            await self._subscribe(self.channel)
        try:
            count = await self.hydrate()
        finally:
            await self._release_buffer()
        await self._ask_owners()
        if self.resyncer is not None:
            resyncer = self.resyncer
            self.operations.on_gap = lambda job_id: resyncer.request(
                f"version gap on job {job_id}"
            )
            resyncer.start()
            if self.config.start_resync_delay is not None:
                self._spawn(self._resync_after_start(opened_at))
        self.housekeeper.start()
        return count

    async def _ask_owners(self) -> None:
        """Request the current status of the running jobs just hydrated from
        their owners, and wait up to `sync_wait` for every one to arrive."""
        waiting = self._awaiting_owners
        wait = self.config.sync_wait
        self._owners_answered.clear()
        try:
            # A stop() that came before the event was cleared cannot end the
            # wait, so its flag is checked here.
            channel = self.channel
            if not waiting or wait is None or channel is None or self._stop_requested:
                return
            request = SyncRequestMessage(origin=self.replica_id)
            await channel.publish(self.subjects.sync, request)
            async with asyncio.timeout(wait):
                await self._owners_answered.wait()
        except (BusError, CodecError) as exc:
            logger.warning(
                "replica %r failed to request current statuses from owners: %s",
                self.replica_id,
                exc,
            )
        except TimeoutError:
            logger.info(
                "replica %r got no current status within %g s for jobs %s: "
                "showing their stored progress",
                self.replica_id,
                wait,
                ", ".join(repr(job_id) for job_id in sorted(waiting)),
            )
        finally:
            waiting.clear()

    async def _answer_sync(self, subject: str, message: SyncRequestMessage) -> None:
        """Publish the held status of every job this replica runs, with its
        version unchanged, for the replica that asked.

        Peers that hold that version already ignore the message.
        """
        operations = self.operations
        if message.origin == self.replica_id:
            return
        for job_id in operations.owned_jobs:
            status = operations.get_status(job_id)
            version = operations.version_of(job_id)
            if status is None or version is None:
                continue
            await operations.publish_status(
                job_id,
                status,
                version,
                what=f"status for starting replica {message.origin!r}",
            )

    async def _receive_progress(self, subject: str, message: ProgressMessage) -> None:
        waiting = self._awaiting_owners
        if waiting and message.job_id in waiting:
            waiting.discard(message.job_id)
            if not waiting:
                self._owners_answered.set()
        await self.operations.handle_progress(subject, message)

    async def _resync_after_start(self, started: float) -> None:
        # NOTE: nats-server 2.15.1 was seen, about once in 200 runs, to deliver
        # none of another connection's messages for a few milliseconds after it
        # confirmed a new subscription, although its counters showed them received.
        assert self.resyncer is not None
        assert self.config.start_resync_delay is not None
        await asyncio.sleep(self.config.start_resync_delay)
        self.resyncer.request("catch-up after start", ended_since=started)

    async def _close(self) -> None:
        self._hydrated = False
        self._buffer.clear()
        self._buffering = False
        await self.housekeeper.stop()
        for task in list(self._background):
            task.cancel()
        if self.resyncer is not None:
            await self.resyncer.stop()
        if self.operations.writer is not None:
            await self.operations.writer.stop(self.config.stop_grace_period)
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self.bus is not None:
            await self.bus.close()
        if self.store is not None:
            await self.store.close()

    async def hydrate(self) -> int:
        """Load the active operations from the store into memory.

        Returns the number of operations read. A row never replaces a newer
        status already received from the bus. Failures within the active window
        are read too, because live replicas keep listing them with their error.
        """
        if self.store is None:
            self._hydrated = True
            return 0
        records = await self.store.list_active(
            self.config.active_window, include_failed=True
        )
        now = datetime.now(UTC)
        self._awaiting_owners = {
            record.id
            for record in records
            if not record.status.terminal
            and record.frontend_id != self.replica_id
            and record.lease_expires_at is not None
            and record.lease_expires_at > now
        }
        for record in records:
            self.operations.restore(
                record.id,
                record.to_status(),
                record.version,
                updated_at=record.updated_at,
            )
            if record.cache_key and self.operations.get_status(record.id) is not None:
                self.opcache.restore(
                    OpCacheEntry(record.cache_key, record.id, record.is_backend_op)
                )
        self._hydrated = True
        return len(records)

    def on_models_invalidated(self, hook: InvalidationHook) -> Callable[[], None]:
        """Call `hook` on every models invalidation; return a function removing it."""
        return self.operations.invalidations.on_models_invalidated(hook)

    def on_backends_invalidated(self, hook: InvalidationHook) -> Callable[[], None]:
        """Call `hook` on every backends invalidation; return a function removing
        it."""
        return self.operations.invalidations.on_backends_invalidated(hook)

    async def invalidate_models(
        self, element: str | None = None, op: OpType | None = None
    ) -> None:
        """Tell every replica, this one included, to reload its models.

        Operations started with `start_operation` do this when they complete.
        Call it for changes made otherwise, such as a model deleted by hand.

        Args:
            element: the model that changed, or None when the whole set changed.
            op: what happened to it; a delete makes peers drop the element.
        """
        await self.operations.invalidations.invalidate_models(element, op)

    async def invalidate_backends(
        self, element: str | None = None, op: OpType | None = None
    ) -> None:
        """Tell every replica, this one included, to reload its backends; see
        `invalidate_models`."""
        await self.operations.invalidations.invalidate_backends(element, op)

    def require_started(self) -> None:
        """Raise `NotStartedError` unless `start` has finished."""
        if not self._started:
            raise NotStartedError(
                f"replica {self.replica_id!r} is not started; await start() first"
            )

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _subscribe(self, channel: Channel) -> None:
        subjects = self.subjects
        pairs: list[tuple[str, Callable[[str, bytes, int], Any], Any]] = [
            (
                subjects.all_progress,
                Channel.decoder(ProgressMessage),
                self._receive_progress,
            ),
            (
                subjects.sync,
                Channel.decoder(SyncRequestMessage),
                self._answer_sync,
            ),
            (
                subjects.all_cancel,
                Channel.decoder(CancelMessage),
                self.operations.handle_cancel,
            ),
            (subjects.all_opcache, _opcache_decoder(subjects), self._handle_opcache),
            (
                subjects.invalidate_models,
                Channel.decoder(InvalidationMessage),
                self.operations.invalidations.handle_invalidation,
            ),
            (
                subjects.invalidate_backends,
                Channel.decoder(InvalidationMessage),
                self.operations.invalidations.handle_invalidation,
            ),
        ]
        # The codec writes JSON without spaces, so this is exactly how the origin
        # field of this replica's own messages reads.
        own_origin = codec.encode({"origin": self.replica_id})[1:-1]
        for pattern, decoder, handler in pairs:
            # Progress, sync and OpCache handlers ignore this replica's own
            # messages, but its invalidation hooks run on the echo.
            skip = (
                own_origin
                if pattern
                in (subjects.all_progress, subjects.sync, subjects.all_opcache)
                else None
            )
            self._subscriptions.append(
                await channel.subscribe(
                    pattern, decoder, self._gate(handler), skip_marker=skip
                )
            )
        if self.bus is not None:
            await self.bus.flush()

    def _gate(
        self, handler: Callable[[str, Any], Awaitable[None]]
    ) -> Callable[[str, Any], Awaitable[None]]:
        """Wrap `handler` so messages wait in the buffer while hydrating."""

        async def receive(subject: str, message: Any) -> None:
            if self._buffering:
                self._buffer.append((handler, subject, message))
                return
            await handler(subject, message)

        return receive

    async def _release_buffer(self) -> None:
        """Apply the messages received during hydration, in arrival order.

        The version rules keep a buffered status from undoing a newer row, and an
        end event buffered here removes an entry the store still listed.
        """
        while self._buffer:
            handler, subject, message = self._buffer.pop(0)
            try:
                await handler(subject, message)
            except BaseException as exc:
                if not raised_by_callback(exc):
                    raise
                logger.exception("buffered message on %r failed", subject)
        self._buffering = False

    async def _handle_opcache(
        self, subject: str, message: OpCacheStartMessage | OpCacheEndMessage
    ) -> None:
        if isinstance(message, OpCacheStartMessage):
            await self.opcache.handle_start(subject, message)
        else:
            await self.opcache.handle_end(subject, message)

    async def resync(self) -> int:
        """Reconcile the mirror with the store now; return how many jobs changed.

        See `replistate.resync` for what a resync repairs. Without a store or a
        bus there is nothing to reconcile and this returns 0.
        """
        if self.resyncer is None:
            return 0
        return await self.resyncer.resync("request")

    def _on_bus_state(self, state: BusState) -> None:
        if state is BusState.DISCONNECTED:
            if not self._bus_lost:
                self._bus_lost_at = time.monotonic()
            self._bus_lost = True
            logger.warning("replica %r lost the bus: not ready", self.replica_id)
        elif state is BusState.CONNECTED and self._started and self._bus_lost:
            self._bus_lost = False
            logger.info("replica %r has the bus again", self.replica_id)
            if self.resyncer is not None:
                # Whatever was published while disconnected is in the store.
                # A job seen completing shortly before the loss may have had its
                # invalidation lost with the connection.
                self.resyncer.request(
                    "bus reconnect",
                    ended_since=self._bus_lost_at - RECONNECT_HOOK_MARGIN,
                )
            if self.store is not None:
                self._spawn(self.housekeeper.check_cancel_intents())

    def _spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Run `coroutine` in a task the replica keeps until it ends."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)

        def finished(done: asyncio.Task[Any]) -> None:
            self._background.discard(done)
            if not done.cancelled() and done.exception() is not None:
                logger.error(
                    "background task of replica %r failed",
                    self.replica_id,
                    exc_info=done.exception(),
                )

        task.add_done_callback(finished)
