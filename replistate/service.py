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

import collections
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from replistate.bus.base import Channel
from replistate.cancel import CancelFunction, CancelOutcome, CancelRouter
from replistate.codec import CancelMessage, ProgressMessage
from replistate.errors import BusError, CodecError
from replistate.invalidation import Invalidations
from replistate.models import NodeProgress, OperationRecord, OpState, OpStatus, OpType
from replistate.opcache import OpCache
from replistate.runner import OperationHandle, OperationRunner, Work
from replistate.store.base import GalleryStore
from replistate.store.writer import StoreWriter
from replistate.subjects import Subjects, validate_job_id

__all__ = [
    "CancelOutcome",
    "ChangeListener",
    "OperationHandle",
    "OperationsService",
    "Work",
]

logger = logging.getLogger(__name__)

MAX_PRUNED_JOBS = 10_000
"""Jobs dropped by retention remembered, so a resync does not restore them."""


@attrs.frozen
class _MirroredStatus:
    status: OpStatus
    version: int | None


ChangeListener = Callable[[str, OpStatus | None], None]
"""Called with the job id and the new status after a held status changes, or
with None after the job left the mirror."""


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
        write_retry_max: maximum wait between two retries of a failed store
            write, in seconds.
        history_size: how many recent terminal results `history` keeps.
        retention: seconds a terminal job stays in memory, counted from its
            end. A job read from the store that ended longer ago is not put
            into memory, because every replica that saw it end has dropped it.
            None keeps every job read.
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
        write_retry_max: float = 5.0,
        history_size: int = 1000,
        retention: float | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.subjects = subjects
        self.opcache = opcache
        self.channel = channel
        self.store = store
        self.writer = (
            StoreWriter(
                store,
                interval=write_interval,
                max_backoff=write_retry_max,
                on_rejected=self._on_write_rejected,
            )
            if store is not None
            else None
        )
        self._held: dict[str, _MirroredStatus] = {}
        self.cancels = CancelRouter(self)
        self.invalidations = Invalidations(
            replica_id=replica_id, subjects=subjects, channel=channel
        )
        self._terminal_since: dict[str, float] = {}
        self.op_types: dict[str, OpType] = {}
        """Operation types of the jobs this replica admitted, sent with writes."""
        self.history_size = history_size
        self.retention = retention
        self._history: collections.OrderedDict[str, OpStatus] = (
            collections.OrderedDict()
        )
        # Jobs dropped by retention, so a resync does not bring them back.
        self._pruned: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.on_gap: Callable[[str], None] | None = None
        """Called with the job id when a received version skips one or more."""
        self.revision = 0
        """Grows with every change of the held statuses, so readers can cache."""
        self._change_listeners: list[ChangeListener] = []
        self._changed_at: dict[str, float] = {}
        self.runner = OperationRunner(self)
        opcache.is_active = self.is_active
        opcache.on_displaced = self._on_displaced

    # Statuses ---------------------------------------------------------------

    def get_status(self, job_id: str) -> OpStatus | None:
        """Return the status of `job_id` held in memory, or None."""
        held = self._held.get(job_id)
        return held.status if held else None

    def changed_at(self, job_id: str) -> float | None:
        """Return the `time.monotonic()` of the last change of `job_id` held here."""
        return self._changed_at.get(job_id)

    def version_of(self, job_id: str) -> int | None:
        """Return the version of the status held for `job_id`, or None."""
        held = self._held.get(job_id)
        return held.version if held else None

    async def fetch_status(self, job_id: str) -> OpStatus | None:
        """Return the status of `job_id` from memory, else from the store.

        A row read from the store is put into memory under the usual rules, so a
        poll that reaches this replica before the start event still finds the job.

        Raises:
            StoreError: the job is not held here and the store cannot be read, so
                whether it exists is unknown.
        """
        validate_job_id(job_id)
        held = self._held.get(job_id)
        if held is not None or self.store is None:
            return held.status if held else None
        record = await self.store.get(job_id)
        if record is None:
            return None
        self._apply(job_id, record.to_status(), record.version)
        return self.get_status(job_id)

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener(job_id, status)` after each change of a held status,
        and `listener(job_id, None)` after a job leaves the mirror.

        Changes from this replica, from peers, from the store and from resyncs
        all count. A job leaves when retention prunes it or a resync finds it
        gone. The listener runs inside the bus callback, so it must not block;
        an exception it raises is logged. Returns a function removing it.
        """
        self._change_listeners.append(listener)
        return lambda: self._change_listeners.remove(listener)

    def _changed(self, job_id: str, status: OpStatus | None) -> None:
        self.revision += 1
        if status is None:
            self._changed_at.pop(job_id, None)
        else:
            self._changed_at[job_id] = time.monotonic()
        for listener in list(self._change_listeners):
            try:
                listener(job_id, status)
            except Exception:
                logger.exception("change listener failed for job %r", job_id)

    def statuses(self) -> dict[str, OpStatus]:
        """Return a copy of every status held, by job id."""
        return {job_id: held.status for job_id, held in self._held.items()}

    async def update_status(self, job_id: str, status: OpStatus) -> bool:
        """Write a new status of `job_id`: memory, then bus, then store.

        The store write is queued on the `StoreWriter`, which coalesces progress
        and retries failures, so this never waits on the store. The held node list
        is kept when `status` has none. Returns whether the status applied: it
        does not once the operation is terminal, because only the store may
        replace one terminal state by another.
        """
        validate_job_id(job_id)
        held = self._held.get(job_id)
        if held is not None and held.status.terminal:
            logger.debug("status of job %r ignored: the job is terminal", job_id)
            return False
        version = (held.version or 0) + 1 if held else 1
        self._apply(job_id, status, version)
        applied = self._held[job_id].status

        await self.publish_status(job_id, applied, version)
        if self.writer is not None:
            entry = self.opcache.get_by_job(job_id)
            self.writer.submit(
                job_id,
                applied,
                version=version,
                frontend_id=self.replica_id,
                urgent=held is None,
                cache_key=entry.cache_key if entry else "",
                is_backend_op=entry.is_backend if entry else False,
                op_type=self.op_types.get(job_id),
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
        logger.warning(
            "terminal state of job %r lost the race to the stored %s",
            job_id,
            stored.status.value,
        )
        await self.adopt_stored(stored)

    async def repair(self, job_id: str) -> None:
        """Write the held terminal state of `job_id` to the store and publish it.

        Used when the store still lists as running a job this replica has as
        ended. The write is conditional: when the store already ended the job
        otherwise, that state is adopted instead.

        Raises:
            StoreError: the store cannot be written.
        """
        held = self._held.get(job_id)
        if held is None or not held.status.terminal or self.store is None:
            return
        version = held.version or 0
        entry = self.opcache.get_by_job(job_id)
        identity: dict[str, Any] = {
            "cache_key": entry.cache_key if entry else "",
            "is_backend_op": entry.is_backend if entry else False,
        }
        applied = await self.store.save_status(
            job_id, held.status, version=version, **identity
        )
        if not applied:
            stored = await self.store.get(job_id)
            if stored is not None and stored.status.terminal:
                await self._on_write_rejected(job_id, stored)
                return
            # The store has a higher version that is not terminal. The end is
            # written above it, because a terminal state must never be lost.
            version = (stored.version if stored else version) + 1
            self._held[job_id] = _MirroredStatus(held.status, version)
            await self.store.save_status(
                job_id, held.status, version=version, **identity
            )
        logger.warning(
            "job %r ended as %s but the store listed it running: written",
            job_id,
            held.status.state.value,
        )
        await self.publish_status(
            job_id, held.status, self._held[job_id].version, what="repaired status"
        )

    async def adopt_stored(self, stored: OperationRecord) -> OpStatus:
        """Hold and publish the terminal state the store decided for a job.

        The state is published with a version above every one this replica saw,
        because progress ticks may have gone out with versions the coalesced store
        never recorded, and peers must not take the decision for a stale message.
        Returns the status now held.
        """
        job_id = stored.id
        self.runner.abandon(job_id)
        held = self._held.get(job_id)
        decided = stored.to_status()
        version = max(held.version or 0 if held else 0, stored.version) + 1
        status = held.status.merged_with(decided) if held else decided
        self._held[job_id] = _MirroredStatus(status, version)
        self._note_terminal(job_id, status)
        self._changed(job_id, status)
        await self.publish_status(job_id, status, version, what="stored state")
        return status

    async def publish_status(
        self,
        job_id: str,
        status: OpStatus,
        version: int | None,
        *,
        what: str = "status",
    ) -> None:
        """Publish `status` of `job_id` with `version` on its progress subject.

        A failure is logged with `what` and the job id, not raised, because the
        store and the resyncs of peers carry the state too.
        """
        if self.channel is None:
            return
        message = ProgressMessage(
            job_id=job_id, status=status, origin=self.replica_id, version=version
        )
        try:
            await self.channel.publish(self.subjects.progress(job_id), message)
        except (BusError, CodecError) as exc:
            logger.warning("%s of job %r not published: %s", what, job_id, exc)

    async def update_node(self, job_id: str, node: NodeProgress) -> OpStatus:
        """Apply one node's progress to the status of `job_id` and write it.

        Returns the status written. See `OpStatus.with_node` for the rules.
        """
        held = self._held.get(job_id)
        base = held.status if held else OpStatus()
        status = base.with_node(node)
        await self.update_status(job_id, status)
        return self._held[job_id].status

    def begin_run(self, job_id: str) -> None:
        """Note that this replica admits a new operation under `job_id`.

        A job id may be used again once its row is cleaned up. The new run's
        versions start again, so what this replica remembers of the old run,
        its pruning and the invalidations it saw, must not apply to it.
        """
        self._pruned.pop(job_id, None)
        self.invalidations.forget_job(job_id)

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
        self,
        job_id: str,
        status: OpStatus,
        version: int,
        *,
        final: bool = False,
        updated_at: datetime | None = None,
    ) -> bool:
        """Put a status read from the store into memory under the usual rules.

        With `final`, a terminal status from the store replaces a held status that
        is not terminal whatever their versions, because the store decides which
        terminal state an operation ends in. `updated_at`, the time the row was
        last written, dates a terminal status: the retention of the job counts
        from then, as it does on the replicas that saw the end live, and a job
        not held here that ended more than `retention` ago is not restored.
        """
        held = self._held.get(job_id)
        if held is None and job_id in self._pruned:
            return False
        age = 0.0
        if status.terminal and updated_at is not None:
            age = max(0.0, (datetime.now(UTC) - updated_at).total_seconds())
            if held is None and self.retention is not None and age >= self.retention:
                return False
        if not self._restore(job_id, status, version, final=final):
            return False
        if age and job_id in self._terminal_since:
            # NOTE: the age compares this host's clock with the store's, so
            # clock skew between them moves the end of retention by as much.
            self._terminal_since[job_id] = min(
                self._terminal_since[job_id], time.monotonic() - age
            )
        return True

    def _restore(
        self, job_id: str, status: OpStatus, version: int, *, final: bool
    ) -> bool:
        held = self._held.get(job_id)
        if (
            final
            and status.terminal
            and held is not None
            and held.status.state is not status.state
        ):
            version = max(version, (held.version or 0) + 1)
            if held.status.terminal:
                # An end this replica saw lost to another one in the store.
                self._held[job_id] = _MirroredStatus(status, version)
                self._note_terminal(job_id, status)
                self._changed(job_id, status)
                return True
            self.runner.abandon(job_id)
        return self._apply(job_id, status, version)

    def forget(self, job_id: str) -> None:
        """Drop the status of `job_id` from memory."""
        if self._held.pop(job_id, None) is not None:
            self._changed(job_id, None)
        self._terminal_since.pop(job_id, None)
        self.invalidations.forget_job(job_id)

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
            if version is None:
                # A peer without versions must not reset the ordering of the job.
                version = held.version
        self._held[job_id] = _MirroredStatus(status, version)
        self._note_terminal(job_id, status)
        self._changed(job_id, status)
        return True

    @property
    def history(self) -> list[tuple[str, OpStatus]]:
        """The jobs that most recently reached a terminal state, oldest first,
        each with its latest terminal status."""
        return list(self._history.items())

    def _note_terminal(self, job_id: str, status: OpStatus) -> None:
        if not status.terminal:
            return
        self._terminal_since.setdefault(job_id, time.monotonic())
        self._history[job_id] = status
        self._history.move_to_end(job_id)
        while len(self._history) > self.history_size:
            self._history.popitem(last=False)

    def completed_since(self, since: float) -> list[str]:
        """Return the jobs held as completed whose end this replica saw after
        `since`, a `time.monotonic()` value."""
        return [
            job_id
            for job_id, seen in self._terminal_since.items()
            if seen >= since
            and (held := self._held.get(job_id)) is not None
            and held.status.state is OpState.COMPLETED
        ]

    def prune(self, retention: float) -> int:
        """Drop jobs terminal for more than `retention` seconds; return how many.

        Their OpCache entries go too, so a failure stops being listed once it is
        that old. `history` keeps the most recent results, and a read of a pruned
        job still finds it in the store.
        """
        deadline = time.monotonic() - retention
        expired = [
            job_id for job_id, since in self._terminal_since.items() if since < deadline
        ]
        for job_id in expired:
            del self._terminal_since[job_id]
            if self._held.pop(job_id, None) is not None:
                self._changed(job_id, None)
            self.op_types.pop(job_id, None)
            self.opcache.discard(job_id)
            self._pruned[job_id] = None
            # A resync replays hooks only for held jobs, so the pruned job's
            # invalidations need no more remembering, and a later run under the
            # same id must run its own.
            self.invalidations.forget_job(job_id)
        while len(self._pruned) > MAX_PRUNED_JOBS:
            self._pruned.popitem(last=False)
        return len(expired)

    # Cancel -----------------------------------------------------------------

    def register_cancel(self, job_id: str, cancel: CancelFunction) -> None:
        """Register the function that stops the work of `job_id` on this replica."""
        self.cancels.register(job_id, cancel)

    def unregister_cancel(self, job_id: str) -> None:
        """Remove the cancel function of `job_id`, if any."""
        self.cancels.unregister(job_id)

    async def cancel(self, job_id: str) -> CancelOutcome:
        """Request the cancel of `job_id`, wherever its work runs.

        The replica holding the cancel function runs it, and any other replica
        stores the request as intent and publishes it on the job's cancel subject.

        Returns:
            ACCEPTED when the request was run or sent, TOO_LATE when the operation
            is already terminal, NOT_CANCELLABLE when its status marks it as
            not cancellable, UNKNOWN when neither the mirror nor the store has the
            job.

        Raises:
            InvalidIdError: `job_id` cannot name a job.
            BusError: the request had to be sent, the bus is not connected and
                the store did not take the intent either.
            StoreError: the job is not held here and the store cannot be read.
        """
        return await self.cancels.request(job_id)

    async def handle_cancel(self, subject: str, message: CancelMessage) -> None:
        """Run the cancel function of a job if it is registered on this replica."""
        await self.cancels.handle_cancel(subject, message)

    async def cancel_owned(self, job_id: str) -> None:
        """Run the cancel function of `job_id` if it is registered here."""
        await self.cancels.run_local(job_id)

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
        exclusive: bool = True,
    ) -> str:
        """Admit an operation and run `work` in a task owned by this replica.

        The job gets a pending status, then is announced in the OpCache. `work`
        receives an `OperationHandle` to report progress. When it returns, the
        operation is completed, the matching invalidation is published and the
        OpCache entry is removed. When it raises, the operation fails with the
        exception's text and the entry stays, so clients see the error. When it
        is cancelled, the operation is marked cancelled and the entry removed.

        The admission and the work belong to the replica, not to the caller: a
        web request cancelled because its client went away stops neither.

        Args:
            cache_key: what the operation acts on, such as ``gallery@model-a``.
            work: the coroutine function doing the work.
            element_name: the gallery element, shown as the operation's name.
            op_type: install, delete or upgrade; sent with the invalidation.
            is_backend: whether it is a backend operation, which invalidates the
                backends instead of the models.
            job_id: the job id; a random UUID when omitted.
            cancellable: whether a cancel request may stop it.
            exclusive: whether to refuse the operation while another one runs on
                the same cache key.

        Returns:
            the job id.

        Raises:
            NotStartedError: the replica is not running.
            OperationConflictError: the job id is in use, in the mirror or, for a
                job id passed in, in the store; or, with `exclusive`, another job
                runs on the cache key. The error names that job.
            InvalidIdError: the job id cannot be used in a subject.
            ValueError: the cache key is empty or contains NUL.
        """
        return await self.runner.start(
            cache_key,
            work,
            element_name=element_name,
            op_type=op_type,
            is_backend=is_backend,
            job_id=job_id,
            cancellable=cancellable,
            exclusive=exclusive,
        )

    async def stop_operations(self, reason: str, grace_period: float = 5.0) -> None:
        """Stop every operation this replica runs, marking each failed with
        `reason`; see `OperationRunner.stop`."""
        await self.runner.stop(reason, grace_period)

    @property
    def owned_jobs(self) -> list[str]:
        """Ids of the operations whose work runs on this replica."""
        return self.runner.owned_jobs

    def is_active(self, job_id: str) -> bool:
        """Return whether `job_id` may still be running: not known as terminal."""
        status = self.get_status(job_id)
        return status is None or not status.terminal

    def _on_displaced(self, job_id: str, winner: str, cache_key: str) -> None:
        self.runner.displace(
            job_id,
            f"job {winner} took cache key {cache_key} at the same time on "
            "another replica",
        )
