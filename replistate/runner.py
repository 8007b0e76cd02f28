"""Operations owned by this replica: admission, the task that runs the work, its end.

The replica that admits an operation runs its work in a task that belongs to the
replica, not to the web request that asked for it. Whatever way the work ends, the
runner writes a terminal status. It is completed when the work returns and failed
with the error text when it raises. A cancel request makes it cancelled, and a
replica that stops first makes it failed with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from replistate.errors import NotStartedError, OperationConflictError, StoreError
from replistate.models import NodeProgress, OpStatus, OpType
from replistate.opcache import OpCacheEntry
from replistate.subjects import validate_job_id

if TYPE_CHECKING:
    from replistate.service import OperationsService

__all__ = ["OperationHandle", "OperationRunner", "Work"]

logger = logging.getLogger(__name__)

Work = Callable[["OperationHandle"], Awaitable[Any]]
"""The work of an operation, given a handle to report progress."""


class OperationRunner:
    """Admits operations and runs their work on this replica.

    Args:
        service: the statuses, OpCache and bus of this replica.
    """

    def __init__(self, service: OperationsService) -> None:
        self.service = service
        self.accepting = False
        self.on_admitted: Callable[[str], Awaitable[None]] | None = None
        """Called with the job id once the OpCache entry is written."""
        self._tasks: dict[str, tuple[asyncio.Task[None], OperationHandle]] = {}
        self._admissions: set[asyncio.Task[None]] = set()
        self._stop_reasons: dict[str, str] = {}

    @property
    def owned_jobs(self) -> list[str]:
        """Ids of the operations whose work runs on this replica."""
        return list(self._tasks)

    async def start(
        self,
        cache_key: str,
        work: Work,
        *,
        element_name: str = "",
        op_type: OpType = OpType.INSTALL,
        is_backend: bool = False,
        job_id: str | None = None,
        cancellable: bool = True,
        exclusive: bool = True,
    ) -> str:
        """Admit an operation and run `work` in a task owned by this replica.

        See `OperationsService.start_operation`, which calls this.
        """
        service = self.service
        if not self.accepting:
            raise NotStartedError(
                f"replica {service.replica_id!r} is not running: start it before "
                "starting operations"
            )
        chosen = job_id is not None
        job_id = validate_job_id(str(uuid.uuid4()) if job_id is None else job_id)
        if not cache_key:
            raise ValueError(f"missing cache key for job {job_id!r}")
        if "\x00" in cache_key:
            # PostgreSQL text cannot hold NUL, so no write of the job would
            # ever be stored.
            raise ValueError(f"invalid cache key {cache_key!r}: it contains NUL")
        if chosen and service.store is not None:
            # A job that ended and left the mirror is still in the store, whose
            # terminal row would win over every write of a new run.
            try:
                stored = await service.store.get(job_id)
            except StoreError as exc:
                # Work goes on while the store is down, unchecked.
                logger.warning("job id %r not checked in the store: %s", job_id, exc)
                stored = None
            if stored is not None:
                raise OperationConflictError(
                    f"job id {job_id!r} is already in use in the store",
                    cache_key,
                    job_id,
                )
        if job_id in self._tasks or service.get_status(job_id) is not None:
            raise OperationConflictError(
                f"job id {job_id!r} is already in use", cache_key, job_id
            )
        running = service.opcache.get(cache_key)
        if exclusive and running is not None and service.is_active(running):
            raise OperationConflictError(
                f"cache key {cache_key!r} has job {running!r} running",
                cache_key,
                running,
            )
        # Claim the key with no await since it was checked, so a second request
        # on this replica finds it taken.
        # NOTE: a peer that still remembers the end of an earlier run under a
        # reused job id ignores the new run's OpCache start event. One that
        # pruned the earlier run does not restore the new run's row in a resync,
        # though the new run's statuses from the bus still apply.
        service.begin_run(job_id)
        service.opcache.restore(OpCacheEntry(cache_key, job_id, is_backend))
        service.op_types[job_id] = op_type

        queued = OpStatus(
            deletion=op_type is OpType.DELETE,
            gallery_element_name=element_name,
            message="queued",
            cancellable=cancellable,
        )
        handle = OperationHandle(service, job_id, cache_key, element_name, op_type)
        task = asyncio.create_task(
            self._run(handle, work, is_backend), name=f"operation {job_id}"
        )
        handle._task = task
        self._tasks[job_id] = (task, handle)
        # Registered even when not cancellable, because the work may allow a
        # cancel later: every cancel checks the status of that moment.
        service.register_cancel(job_id, handle._request_cancel)
        admission = asyncio.create_task(
            self._admit_or_cancel(handle, queued, is_backend),
            name=f"admission of {job_id}",
        )
        self._admissions.add(admission)
        admission.add_done_callback(self._admission_done)
        # The caller only waits: a web request cancelled because its client went
        # away must neither stop the admission halfway nor the work behind it.
        await asyncio.shield(admission)
        return job_id

    async def _admit_or_cancel(
        self, handle: OperationHandle, queued: OpStatus, is_backend: bool
    ) -> None:
        try:
            await self._admit(handle, queued, is_backend)
        except BaseException as exc:
            # The caller gets the error, so the work must not start behind it.
            logger.warning(
                "admission of job %r failed, its work will not run: %s",
                handle.job_id,
                str(exc) or type(exc).__name__,
            )
            handle._request_cancel()
            raise
        finally:
            # Whatever happens, the task must not wait for admission forever.
            handle._admitted.set()

    def _admission_done(self, admission: asyncio.Task[None]) -> None:
        self._admissions.discard(admission)
        if not admission.cancelled():
            # Logged above; read here so a caller that went away leaves no
            # "exception never retrieved" report behind.
            admission.exception()

    async def _admit(
        self, handle: OperationHandle, queued: OpStatus, is_backend: bool
    ) -> None:
        """Write the queued status, then the OpCache entry and the first lease."""
        service = self.service
        job_id = handle.job_id
        await service.update_status(job_id, queued)
        if handle._finished:
            # Cancelled already: its end event must not be followed by a start.
            return
        set_entry = service.opcache.set_backend if is_backend else service.opcache.set
        await set_entry(
            handle.cache_key,
            job_id,
            element_name=handle.element_name,
            op_type=handle.op_type,
            version=service.version_of(job_id),
        )
        if self.on_admitted is not None:
            await self.on_admitted(job_id)

    async def stop(self, reason: str, grace_period: float = 5.0) -> None:
        """Stop every operation this replica runs, marking each failed with
        `reason`.

        Work that does not end within `grace_period` seconds of its cancel is
        marked failed all the same and left behind; its later updates are ignored.
        """
        self.accepting = False
        tasks = list(self._tasks.values())
        for _, handle in tasks:
            self._stop_reasons[handle.job_id] = reason
            handle._request_cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(
            [task for task, _ in tasks], timeout=grace_period
        )
        for task, handle in tasks:
            if task in pending:
                logger.warning(
                    "job %r ignored its cancel for %.1f s: marked failed and left "
                    "running",
                    handle.job_id,
                    grace_period,
                )
                await self._finish(
                    handle, is_backend=False, failure=RuntimeError(reason)
                )
                self._tasks.pop(handle.job_id, None)

    def abandon(self, job_id: str) -> None:
        """Stop the work of `job_id` without writing its end.

        Used when the store already decided how the job ended, for example when a
        peer reaped it while this owner could not renew its lease.
        """
        entry = self._tasks.get(job_id)
        if entry is None:
            return
        handle = entry[1]
        logger.warning("work of job %r stopped: the store already ended it", job_id)
        handle._abandoned = True
        handle._request_cancel()
        handle._finished = True
        self.service.unregister_cancel(job_id)

    def displace(self, job_id: str, reason: str) -> None:
        """Stop the work of `job_id` if it runs here, marking it failed with
        `reason`."""
        entry = self._tasks.get(job_id)
        if entry is None:
            return
        self._stop_reasons[job_id] = reason
        entry[1]._request_cancel()

    async def _run(self, handle: OperationHandle, work: Work, is_backend: bool) -> None:
        job_id = handle.job_id
        handle._started = True
        failure: BaseException | None = None
        cancelled = False

        try:
            # The queued status and the OpCache entry go out before any progress.
            await handle._admitted.wait()
            if not handle._cancel_requested:
                await self._check_stored_cancel(handle)
            if handle._cancel_requested:
                # Cancelled while queued: the work never starts.
                raise asyncio.CancelledError
            await work(handle)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException as exc:
            failure = exc

        if handle._abandoned:
            self._tasks.pop(job_id, None)
            return

        # From here on a cancel request has no effect, so the final status is
        # always written whole.
        handle._finished = True
        self.service.unregister_cancel(job_id)
        reason = self._stop_reasons.pop(job_id, None)
        try:
            if cancelled and reason is not None:
                await self._finish(handle, is_backend, RuntimeError(reason))
            else:
                await self._finish(handle, is_backend, failure, cancelled=cancelled)
        finally:
            self._tasks.pop(job_id, None)

        if failure is not None and not isinstance(failure, Exception):
            # KeyboardInterrupt and SystemExit go on once the status is written.
            raise failure

    async def _check_stored_cancel(self, handle: OperationHandle) -> None:
        store = self.service.store
        if store is None:
            return
        try:
            row = await store.get(handle.job_id)
        except StoreError as exc:
            logger.warning(
                "stored cancel intent of job %r not read: %s", handle.job_id, exc
            )
            return
        if row is not None and row.cancel_requested:
            logger.info("job %r was cancelled before it started", handle.job_id)
            handle._cancel_requested = True

    async def _finish(
        self,
        handle: OperationHandle,
        is_backend: bool,
        failure: BaseException | None,
        *,
        cancelled: bool = False,
    ) -> None:
        service = self.service
        job_id = handle.job_id
        handle._finished = True
        base = service.get_status(job_id) or OpStatus()
        if cancelled:
            final = attrs.evolve(
                base, cancelled=True, cancellable=False, message="cancelled"
            )
            await service.update_status(job_id, final)
            await service.opcache.delete_job(job_id, version=service.version_of(job_id))
            logger.info("job %r cancelled", job_id)
        elif failure is not None:
            final = attrs.evolve(base, processed=True, error=failure, cancellable=False)
            await service.update_status(job_id, final)
            logger.warning("job %r failed: %s", job_id, final.error)
        else:
            # An error reported on the way was recoverable: the work succeeded.
            final = attrs.evolve(
                base,
                processed=True,
                progress=100.0,
                message="completed",
                error=None,
                cancellable=False,
            )
            await service.update_status(job_id, final)
            invalidate = (
                service.invalidations.invalidate_backends
                if is_backend
                else service.invalidations.invalidate_models
            )
            version = service.version_of(job_id)
            # The element as the final status, and so the stored row, names it,
            # which the work may have changed. A resync's replay of this
            # invalidation then gives hooks the same element.
            ended = service.get_status(job_id)
            element = ended.gallery_element_name if ended else handle.element_name
            await invalidate(
                element or None,
                handle.op_type,
                job_id=job_id,
                version=version,
            )
            await service.opcache.delete_job(job_id, version=version)
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
        self._admitted = asyncio.Event()
        self._started = False
        self._finished = False
        self._abandoned = False
        self._cancel_requested = False

    @property
    def status(self) -> OpStatus:
        """The status held for this operation."""
        return self._service.get_status(self.job_id) or OpStatus()

    async def update(self, **changes: Any) -> bool:
        """Write the held status with `changes` applied, such as ``progress=42.0``.

        Returns whether it applied; it does not once the operation is terminal.
        """
        if self._finished:
            return False
        return await self._service.update_status(
            self.job_id, attrs.evolve(self.status, **changes)
        )

    async def node(self, node: NodeProgress) -> OpStatus:
        """Write one node's progress, merged by the rules of `OpStatus.with_node`."""
        if self._finished:
            return self.status
        return await self._service.update_node(self.job_id, node)

    def _request_cancel(self) -> None:
        self._cancel_requested = True
        # A task cancelled before its first step never runs its body, so the
        # cancelled status would never be written: it checks the flag instead.
        if self._started and not self._finished and self._task is not None:
            self._task.cancel()
