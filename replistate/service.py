"""Operation statuses, cancel routing and invalidation hooks, mirrored on replicas.

Every replica keeps the status of each active operation in memory. The replica that
writes a status applies it to memory, publishes it, then stores it; peers apply what
they receive. Each status carries a version that grows per operation, and two rules
decide whether a received status applies:

- a status whose version is not higher than the held one is stale and ignored;
- a non-terminal status never replaces a terminal one.

A status without a version (from a LocalAI peer) is subject to the second rule only.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from replistate.bus.base import Channel
from replistate.codec import CancelMessage, InvalidationMessage, ProgressMessage
from replistate.errors import BusError, EncodeError, StoreError
from replistate.models import NodeProgress, OperationRecord, OpStatus, OpType
from replistate.opcache import OpCache
from replistate.store.base import GalleryStore
from replistate.store.writer import StoreWriter
from replistate.subjects import Subjects, validate_job_id

__all__ = [
    "CancelOutcome",
    "InvalidationHook",
    "OperationHandle",
    "OperationsService",
    "Work",
]

logger = logging.getLogger(__name__)

InvalidationHook = Callable[[InvalidationMessage], Awaitable[None] | None]
"""Called with each invalidation received, this replica's own included."""

MAX_SEEN_INVALIDATIONS = 1000
"""Invalidations with a version remembered to run their hooks only once."""

CancelFunction = Callable[[], Awaitable[None] | None]

Work = Callable[["OperationHandle"], Awaitable[Any]]
"""The work of an operation, given a handle to report progress."""


class CancelOutcome(enum.Enum):
    """Outcome of a cancel request."""

    ACCEPTED = "accepted"
    TOO_LATE = "too_late"
    UNKNOWN = "unknown"


@attrs.frozen
class _MirroredStatus:
    status: OpStatus
    version: int | None


class OperationsService:
    """Statuses, cancel functions and invalidation hooks of one replica.

    Args:
        replica_id: this replica's id, sent as the origin of each message.
        subjects: the subject names.
        opcache: the OpCache of this replica.
        channel: the typed bus, or None in standalone mode.
        store: the durable store, or None in standalone mode.
        write_interval: seconds between two progress writes of one job to the
            store; start and terminal writes are not delayed.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        subjects: Subjects,
        opcache: OpCache,
        channel: Channel | None = None,
        store: GalleryStore | None = None,
        write_interval: float = 0.5,
    ) -> None:
        self.replica_id = replica_id
        self.subjects = subjects
        self.opcache = opcache
        self.channel = channel
        self.store = store
        self.writer = (
            StoreWriter(
                store, interval=write_interval, on_rejected=self._on_write_rejected
            )
            if store is not None
            else None
        )
        self._held: dict[str, _MirroredStatus] = {}
        self._cancel_functions: dict[str, CancelFunction] = {}
        self._model_hooks: list[InvalidationHook] = []
        self._backend_hooks: list[InvalidationHook] = []
        self._tasks: dict[str, tuple[asyncio.Task[None], OperationHandle]] = {}
        self._seen_invalidations: collections.OrderedDict[
            tuple[str, str | None, str | None, OpType | None, int], None
        ] = collections.OrderedDict()
        self.on_gap: Callable[[str], None] | None = None
        """Called with the job id when a received version skips one or more."""
        self._stop_reasons: dict[str, str] = {}

    # Statuses ---------------------------------------------------------------

    def get_status(self, job_id: str) -> OpStatus | None:
        """Return the status of `job_id` held in memory, or None."""
        held = self._held.get(job_id)
        return held.status if held else None

    def version_of(self, job_id: str) -> int | None:
        """Return the version of the status held for `job_id`, or None."""
        held = self._held.get(job_id)
        return held.version if held else None

    async def fetch_status(self, job_id: str) -> OpStatus | None:
        """Return the status of `job_id` from memory, else from the store.

        A row read from the store is put into memory under the usual rules, so a
        poll that reaches this replica before the start event still finds the job.
        """
        held = self._held.get(job_id)
        if held is not None or self.store is None:
            return held.status if held else None
        try:
            record = await self.store.get(job_id)
        except StoreError as exc:
            logger.warning("read of job %r from the store failed: %s", job_id, exc)
            return None
        if record is None:
            return None
        self._apply(job_id, record.to_status(), record.version)
        return self.get_status(job_id)

    def statuses(self) -> dict[str, OpStatus]:
        """Return a copy of every status held, by job id."""
        return {job_id: held.status for job_id, held in self._held.items()}

    async def update_status(self, job_id: str, status: OpStatus) -> bool:
        """Write a new status of `job_id`: memory, then bus, then store.

        The store write is queued on the `StoreWriter`, which coalesces progress
        and retries failures, so this never waits on the store. The held node list
        is kept when `status` has none. Returns whether the status applied: it
        does not once the operation is terminal and `status` is not.
        """
        validate_job_id(job_id)
        held = self._held.get(job_id)
        version = (held.version or 0) + 1 if held else 1
        if not self._apply(job_id, status, version):
            logger.debug("status of job %r ignored: the job is terminal", job_id)
            return False
        applied = self._held[job_id].status

        if self.channel is not None:
            message = ProgressMessage(
                job_id=job_id, status=applied, origin=self.replica_id, version=version
            )
            try:
                await self.channel.publish(self.subjects.progress(job_id), message)
            except (BusError, EncodeError) as exc:
                logger.warning("status of job %r not published: %s", job_id, exc)
        if self.writer is not None:
            self.writer.submit(
                job_id,
                applied,
                version=version,
                frontend_id=self.replica_id,
                urgent=held is None,
            )
        return True

    async def _on_write_rejected(
        self, job_id: str, stored: OperationRecord | None
    ) -> None:
        """Adopt and publish the terminal state that won the race in the store."""
        if stored is None or not stored.status.terminal:
            return
        held = self._held.get(job_id)
        if held is not None and held.status.state is stored.status:
            return
        winner = stored.to_status()
        version = max(held.version or 0 if held else 0, stored.version) + 1
        status = held.status.merged_with(winner) if held else winner
        self._held[job_id] = _MirroredStatus(status, version)
        logger.warning(
            "terminal state of job %r lost the race to the stored %s",
            job_id,
            stored.status.value,
        )
        if self.channel is not None:
            message = ProgressMessage(
                job_id=job_id, status=status, origin=self.replica_id, version=version
            )
            try:
                await self.channel.publish(self.subjects.progress(job_id), message)
            except (BusError, EncodeError) as exc:
                logger.warning("winner of job %r not published: %s", job_id, exc)

    async def update_node(self, job_id: str, node: NodeProgress) -> OpStatus:
        """Apply one node's progress to the status of `job_id` and write it.

        Returns the status written. See `OpStatus.with_node` for the rules.
        """
        held = self._held.get(job_id)
        base = held.status if held else OpStatus()
        status = base.with_node(node)
        await self.update_status(job_id, status)
        return self._held[job_id].status

    async def handle_progress(self, subject: str, message: ProgressMessage) -> None:
        """Apply a status received from the bus."""
        if message.origin == self.replica_id:
            return
        job_id = message.job_id
        if self.subjects.job_id_of(subject) != job_id:
            logger.warning(
                "dropped status of job %r received on subject %r of another job",
                job_id,
                subject,
            )
            return
        held = self._held.get(job_id)
        gap = (
            held is not None
            and held.version is not None
            and message.version is not None
            and message.version > held.version + 1
        )
        self._apply(job_id, message.status, message.version)
        if gap and self.on_gap is not None:
            # Versions of one job grow by one, so a jump means messages were lost.
            self.on_gap(job_id)

    def restore(
        self, job_id: str, status: OpStatus, version: int, *, final: bool = False
    ) -> bool:
        """Put a status read from the store into memory under the usual rules.

        With `final`, a terminal status from the store replaces a held status that
        is not terminal whatever their versions, because the store decides which
        terminal state an operation ends in.
        """
        held = self._held.get(job_id)
        if final and status.terminal and held is not None and not held.status.terminal:
            version = max(version, (held.version or 0) + 1)
        return self._apply(job_id, status, version)

    def forget(self, job_id: str) -> None:
        """Drop the status of `job_id` from memory."""
        self._held.pop(job_id, None)

    def _apply(self, job_id: str, status: OpStatus, version: int | None) -> bool:
        held = self._held.get(job_id)
        if held is not None:
            if (
                version is not None
                and held.version is not None
                and version <= held.version
            ):
                return False
            if held.status.terminal and (not status.terminal or version is None):
                return False
            status = held.status.merged_with(status)
        self._held[job_id] = _MirroredStatus(status, version)
        return True

    # Cancel -----------------------------------------------------------------

    def register_cancel(self, job_id: str, cancel: CancelFunction) -> None:
        """Register the function that stops the work of `job_id` on this replica."""
        self._cancel_functions[job_id] = cancel

    def unregister_cancel(self, job_id: str) -> None:
        """Remove the cancel function of `job_id`, if any."""
        self._cancel_functions.pop(job_id, None)

    async def cancel(self, job_id: str) -> CancelOutcome:
        """Request the cancel of `job_id`, wherever its work runs.

        The replica holding the cancel function runs it, and any other replica
        publishes the request on the job's cancel subject.

        Returns:
            ACCEPTED when the request was run or sent, TOO_LATE when the operation
            is already terminal, UNKNOWN when neither the mirror nor the store
            has the job.
        """
        validate_job_id(job_id)
        status = await self.fetch_status(job_id)
        local = job_id in self._cancel_functions
        if status is None and not local and self.opcache.get_by_job(job_id) is None:
            return CancelOutcome.UNKNOWN
        if status is not None and status.terminal:
            return CancelOutcome.TOO_LATE
        if local:
            await self._run_cancel(job_id)
            return CancelOutcome.ACCEPTED
        if self.channel is None:
            return CancelOutcome.UNKNOWN
        message = CancelMessage(
            id=job_id, origin=self.replica_id, version=self.version_of(job_id)
        )
        await self.channel.publish(self.subjects.cancel(job_id), message)
        logger.info("cancel of job %r sent to its owner", job_id)
        return CancelOutcome.ACCEPTED

    async def handle_cancel(self, subject: str, message: CancelMessage) -> None:
        """Run the cancel function of a job if it is registered on this replica."""
        job_id = message.id
        if self.subjects.job_id_of(subject) != job_id:
            logger.warning(
                "dropped cancel of job %r received on subject %r of another job",
                job_id,
                subject,
            )
            return
        if job_id in self._cancel_functions:
            logger.info(
                "cancel of job %r received from replica %r", job_id, message.origin
            )
            await self._run_cancel(job_id)

    async def _run_cancel(self, job_id: str) -> None:
        cancel = self._cancel_functions.get(job_id)
        if cancel is None:
            return
        try:
            result = cancel()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("cancel function of job %r failed", job_id)

    # Invalidation -----------------------------------------------------------

    def on_models_invalidated(self, hook: InvalidationHook) -> Callable[[], None]:
        """Call `hook` on every models invalidation; return a function removing it."""
        self._model_hooks.append(hook)
        return lambda: self._model_hooks.remove(hook)

    def on_backends_invalidated(self, hook: InvalidationHook) -> Callable[[], None]:
        """Call `hook` on every backends invalidation; return a function removing
        it."""
        self._backend_hooks.append(hook)
        return lambda: self._backend_hooks.remove(hook)

    async def invalidate_models(
        self,
        element: str | None = None,
        op: OpType | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """Tell every replica, this one included, to reload its models.

        Args:
            element: the model that changed, or None when the whole set changed.
            op: what happened to it.
            version: the status version of the operation that caused it.
        """
        await self._invalidate(self.subjects.invalidate_models, element, op, version)

    async def invalidate_backends(
        self,
        element: str | None = None,
        op: OpType | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """Tell every replica, this one included, to reload its backends."""
        await self._invalidate(self.subjects.invalidate_backends, element, op, version)

    async def handle_invalidation(
        self, subject: str, message: InvalidationMessage
    ) -> None:
        """Run the hooks of the invalidation received on `subject`.

        An invalidation caused by an operation carries its version. The same one
        seen twice, live and again from a resync, or replayed by the bus after a
        reconnect, runs the hooks once.
        """
        if subject == self.subjects.invalidate_models:
            hooks = self._model_hooks
        elif subject == self.subjects.invalidate_backends:
            hooks = self._backend_hooks
        else:
            return
        if message.version is not None:
            key = (
                subject,
                message.origin,
                message.element,
                message.op,
                message.version,
            )
            if key in self._seen_invalidations:
                return
            self._seen_invalidations[key] = None
            while len(self._seen_invalidations) > MAX_SEEN_INVALIDATIONS:
                self._seen_invalidations.popitem(last=False)
        for hook in list(hooks):
            try:
                result = hook(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "invalidation hook %r failed on %r for element %r",
                    getattr(hook, "__qualname__", hook),
                    subject,
                    message.element,
                )

    async def _invalidate(
        self,
        subject: str,
        element: str | None,
        op: OpType | None,
        version: int | None,
    ) -> None:
        message = InvalidationMessage(
            element=element, op=op, origin=self.replica_id, version=version
        )
        if self.channel is None:
            # Standalone: there is no echo, so run the hooks here.
            await self.handle_invalidation(subject, message)
            return
        try:
            await self.channel.publish(subject, message)
        except (BusError, EncodeError) as exc:
            logger.warning(
                "invalidation of element %r not published on %r, running local "
                "hooks only: %s",
                element,
                subject,
                exc,
            )
            await self.handle_invalidation(subject, message)

    # Owned operations -------------------------------------------------------

    async def start_operation(
        self,
        cache_key: str,
        work: Work,
        *,
        element_name: str = "",
        op_type: OpType = OpType.INSTALL,
        is_backend: bool = False,
        job_id: str | None = None,
        cancellable: bool = True,
    ) -> str:
        """Admit an operation and run `work` in a task owned by this replica.

        The job gets a pending status, then is announced in the OpCache. `work` receives
        an `OperationHandle` to report progress. When it returns, the operation is
        completed, the matching invalidation is published and the OpCache entry is
        removed. When it raises, the operation fails with the exception's text and
        the entry stays, so clients see the error. When it is cancelled, the
        operation is marked cancelled and the entry removed.

        The task belongs to the service, not to the caller: a web request that
        starts an operation may end without stopping it.

        Returns:
            the job id.
        """
        job_id = validate_job_id(job_id or str(uuid.uuid4()))
        queued = OpStatus(
            deletion=op_type is OpType.DELETE,
            gallery_element_name=element_name,
            message="queued",
            cancellable=cancellable,
        )
        await self.update_status(job_id, queued)
        set_entry = self.opcache.set_backend if is_backend else self.opcache.set
        await set_entry(
            cache_key,
            job_id,
            element_name=element_name,
            op_type=op_type,
            version=self.version_of(job_id),
        )

        handle = OperationHandle(self, job_id, cache_key, element_name, op_type)
        task = asyncio.create_task(
            self._run_operation(handle, work, is_backend), name=f"operation {job_id}"
        )
        handle._task = task
        self._tasks[job_id] = (task, handle)
        if cancellable:
            self.register_cancel(job_id, handle._request_cancel)
        return job_id

    async def stop_operations(self, reason: str) -> None:
        """Stop every operation this replica runs, marking each failed with
        `reason`."""
        tasks = list(self._tasks.values())
        for _, handle in tasks:
            self._stop_reasons[handle.job_id] = reason
            handle._request_cancel()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)

    @property
    def owned_jobs(self) -> list[str]:
        """Ids of the operations whose work runs on this replica."""
        return list(self._tasks)

    async def _run_operation(
        self, handle: OperationHandle, work: Work, is_backend: bool
    ) -> None:
        job_id = handle.job_id
        handle._started = True
        failure: Exception | None = None
        cancelled = False
        try:
            if handle._cancel_requested:
                # Cancelled while queued: the work never starts.
                raise asyncio.CancelledError
            await work(handle)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:
            failure = exc
        # From here on a cancel request has no effect, so the final status is
        # always written whole.
        handle._finished = True
        self.unregister_cancel(job_id)
        try:
            await self._finish(handle, is_backend, cancelled, failure)
        finally:
            self._tasks.pop(job_id, None)

    async def _finish(
        self,
        handle: OperationHandle,
        is_backend: bool,
        cancelled: bool,
        failure: Exception | None,
    ) -> None:
        job_id = handle.job_id
        base = self.get_status(job_id) or OpStatus()
        reason = self._stop_reasons.pop(job_id, None)
        if cancelled and reason is None:
            final = attrs.evolve(
                base, cancelled=True, cancellable=False, message="cancelled"
            )
            await self.update_status(job_id, final)
            await self.opcache.delete_job(job_id, version=self.version_of(job_id))
            logger.info("job %r cancelled", job_id)
        elif cancelled or failure is not None:
            error = reason if cancelled else failure
            final = attrs.evolve(base, processed=True, error=error, cancellable=False)
            await self.update_status(job_id, final)
            logger.warning("job %r failed: %s", job_id, final.error)
        else:
            final = attrs.evolve(
                base,
                processed=True,
                progress=100.0,
                message="completed",
                cancellable=False,
            )
            await self.update_status(job_id, final)
            invalidate = (
                self.invalidate_backends if is_backend else self.invalidate_models
            )
            version = self.version_of(job_id)
            await invalidate(
                handle.element_name or None, handle.op_type, version=version
            )
            await self.opcache.delete_job(job_id, version=version)
            logger.info("job %r completed", job_id)


class OperationHandle:
    """Progress reporter handed to the work of an operation.

    Attributes:
        job_id: the operation's job id.
        cache_key: the OpCache key it acts on.
        element_name: the gallery element it acts on.
        op_type: install, delete or upgrade.
    """

    def __init__(
        self,
        service: OperationsService,
        job_id: str,
        cache_key: str,
        element_name: str,
        op_type: OpType,
    ) -> None:
        self._service = service
        self.job_id = job_id
        self.cache_key = cache_key
        self.element_name = element_name
        self.op_type = op_type
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._finished = False
        self._cancel_requested = False

    @property
    def status(self) -> OpStatus:
        """The status held for this operation."""
        return self._service.get_status(self.job_id) or OpStatus()

    async def update(self, **changes: Any) -> bool:
        """Write the held status with `changes` applied, such as ``progress=42.0``.

        Returns whether it applied; it does not once the operation is terminal.
        """
        return await self._service.update_status(
            self.job_id, attrs.evolve(self.status, **changes)
        )

    async def node(self, node: NodeProgress) -> OpStatus:
        """Write one node's progress, merged by the rules of `OpStatus.with_node`."""
        return await self._service.update_node(self.job_id, node)

    def _request_cancel(self) -> None:
        self._cancel_requested = True
        # A task cancelled before its first step never runs its body, so the
        # cancelled status would never be written: it checks the flag instead.
        if self._started and not self._finished and self._task is not None:
            self._task.cancel()
