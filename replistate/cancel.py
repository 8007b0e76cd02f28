"""Cancel routing: a cancel requested on any replica reaches the work wherever it runs.

The replica that runs an operation registers the function that stops its work.
A cancel requested there runs that function at once. A cancel requested on any
other replica is stored as intent and published on the job's cancel subject. The
owner runs it when the message arrives, or finds the stored intent at its next
check when it missed the message.

Every cancel, the owner's included, respects the `cancellable` flag the job has
at that moment, because the work decides when it may be stopped.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from replistate.bus.base import raised_by_callback
from replistate.codec import CancelMessage
from replistate.errors import BusError, StoreError
from replistate.models import OperationRecord
from replistate.subjects import validate_job_id

if TYPE_CHECKING:
    from replistate.service import OperationsService

__all__ = ["CancelFunction", "CancelOutcome", "CancelRouter"]

logger = logging.getLogger(__name__)

CancelFunction = Callable[[], Awaitable[None] | None]
"""A function that stops the work of one operation, registered by its owner."""


class CancelOutcome(enum.Enum):
    """Outcome of a cancel request."""

    ACCEPTED = "accepted"
    TOO_LATE = "too_late"
    NOT_CANCELLABLE = "not_cancellable"
    UNKNOWN = "unknown"


class CancelRouter:
    """The cancel functions of one replica, and the routing of cancel requests.

    Args:
        service: the statuses, store and bus of this replica.
    """

    def __init__(self, service: OperationsService) -> None:
        self.service = service
        self._functions: dict[str, CancelFunction] = {}

    def register(self, job_id: str, cancel: CancelFunction) -> None:
        """Register the function that stops the work of `job_id` on this replica."""
        self._functions[job_id] = cancel

    def unregister(self, job_id: str) -> None:
        """Remove the cancel function of `job_id`, if any."""
        self._functions.pop(job_id, None)

    async def request(self, job_id: str) -> CancelOutcome:
        """Request the cancel of `job_id`; see `OperationsService.cancel`."""
        service = self.service
        validate_job_id(job_id)
        status = await service.fetch_status(job_id)
        local = job_id in self._functions
        if status is None and not local and service.opcache.get_by_job(job_id) is None:
            return CancelOutcome.UNKNOWN
        if status is not None and status.terminal:
            return CancelOutcome.TOO_LATE
        if status is not None and not status.cancellable:
            return CancelOutcome.NOT_CANCELLABLE
        if local:
            await self.run_local(job_id)
            return CancelOutcome.ACCEPTED
        if service.channel is None:
            return CancelOutcome.UNKNOWN

        # The intent is stored while the message goes out, so the store's round
        # trip does not delay the owner. An owner that misses the message finds
        # the intent at its next check, on reconnect and every reap period, and
        # the reaper finishes the cancel of an orphan.
        storing = (
            asyncio.create_task(self._store_intent(job_id))
            if service.store is not None
            else None
        )
        message = CancelMessage(
            id=job_id, origin=service.replica_id, version=service.version_of(job_id)
        )
        try:
            await service.channel.publish(service.subjects.cancel(job_id), message)
        except BusError as exc:
            row = await storing if storing is not None else None
            if row is None:
                raise
            # With the bus down, the status held here may be stale: the stored
            # row shows whether the job already ended. A job not cancellable
            # now is cancelled by its owner once it is again.
            if row.status.terminal:
                return CancelOutcome.TOO_LATE
            logger.warning(
                "cancel of job %r stored but not sent, so its owner finds it at "
                "its next check: %s",
                job_id,
                exc,
            )
            return CancelOutcome.ACCEPTED
        if storing is not None:
            await storing
        logger.info("cancel of job %r sent to its owner", job_id)

        return CancelOutcome.ACCEPTED

    async def _store_intent(self, job_id: str) -> OperationRecord | None:
        """Store the cancel intent of `job_id`; return the row that took it."""
        assert self.service.store is not None
        try:
            return await self.service.store.request_cancel(job_id)
        except StoreError as exc:
            logger.warning(
                "cancel intent of job %r not stored, sent on the bus only: %s",
                job_id,
                exc,
            )
            return None

    async def handle_cancel(self, subject: str, message: CancelMessage) -> None:
        """Run the cancel function of a job if it is registered on this replica."""
        job_id = message.id
        if self.service.subjects.job_id_of(subject) != job_id:
            logger.warning(
                "dropped cancel of job %r received on subject %r of another job",
                job_id,
                subject,
            )
            return
        if job_id in self._functions:
            logger.info(
                "cancel of job %r received from replica %r", job_id, message.origin
            )
            await self.run_local(job_id)

    async def run_local(self, job_id: str) -> None:
        """Run the cancel function of `job_id` if it is registered here and the
        job is cancellable now. An exception the function raises is logged."""
        cancel = self._functions.get(job_id)
        if cancel is None:
            return
        status = self.service.get_status(job_id)
        if status is not None and not status.cancellable:
            logger.info("cancel of job %r ignored: it is not cancellable now", job_id)
            return
        try:
            result = cancel()
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            if not raised_by_callback(exc):
                raise
            logger.exception("cancel function of job %r failed", job_id)
