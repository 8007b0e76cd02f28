"""An in-process `GalleryStore`, for tests and standalone use."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import attrs

from replistate.models import (
    TERMINAL_STATES,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
)
from replistate.store.base import ACTIVE_WINDOW

__all__ = ["InMemoryStore"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class InMemoryStore:
    """A `GalleryStore` in a dict, with the same conditional writes as PostgreSQL.

    Several replicas of one test share one instance, as they would share a
    database.

    Args:
        clock: returns the current time, aware; tests pass a fake one to move
            rows out of the active window.
    """

    def __init__(self, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.clock = clock
        self.rows: dict[str, OperationRecord] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ensure_schema(self) -> None:
        pass

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        now = self.clock()
        held = self.rows.get(record.id)
        if held is None:
            self.rows[record.id] = attrs.evolve(
                record, created_at=record.created_at or now, updated_at=now
            )
            return
        self.rows[record.id] = attrs.evolve(
            held,
            gallery_element_name=record.gallery_element_name
            or held.gallery_element_name,
            cache_key=held.cache_key or record.cache_key,
            is_backend_op=held.is_backend_op or record.is_backend_op,
            op_type=record.op_type,
            frontend_id=record.frontend_id or held.frontend_id,
            updated_at=now,
        )

    async def save_status(
        self,
        job_id: str,
        status: OpStatus,
        *,
        version: int,
        frontend_id: str = "",
        cache_key: str = "",
        is_backend_op: bool = False,
        op_type: OpType | None = None,
    ) -> bool:
        now = self.clock()
        held = self.rows.get(job_id)
        if held is not None and (
            held.version >= version or held.status in TERMINAL_STATES
        ):
            return False
        update = OperationRecord.from_status(
            job_id,
            status,
            version=version,
            cache_key=cache_key,
            is_backend_op=is_backend_op,
        )
        if op_type is not None:
            update = attrs.evolve(update, op_type=op_type)
        if held is None:
            self.rows[job_id] = attrs.evolve(
                update, frontend_id=frontend_id, created_at=now, updated_at=now
            )
            return True
        self.rows[job_id] = attrs.evolve(
            update,
            gallery_element_name=update.gallery_element_name
            or held.gallery_element_name,
            cache_key=held.cache_key or cache_key,
            is_backend_op=held.is_backend_op or is_backend_op,
            op_type=op_type or held.op_type,
            frontend_id=frontend_id or held.frontend_id,
            created_at=held.created_at,
            updated_at=now,
            lease_expires_at=held.lease_expires_at,
            cancel_requested=held.cancel_requested,
        )
        return True

    async def get(self, job_id: str) -> OperationRecord | None:
        return self.rows.get(job_id)

    async def get_many(self, job_ids: list[str]) -> list[OperationRecord]:
        return [self.rows[job_id] for job_id in job_ids if job_id in self.rows]

    async def list_active(
        self, window: timedelta = ACTIVE_WINDOW, *, include_failed: bool = False
    ) -> list[OperationRecord]:
        now = self.clock()
        since = now - window
        return sorted(
            (
                row
                for row in self.rows.values()
                if (
                    row.status not in TERMINAL_STATES
                    or (include_failed and row.status is OpState.FAILED)
                )
                and (
                    (row.updated_at is not None and row.updated_at >= since)
                    or (row.lease_expires_at is not None and row.lease_expires_at > now)
                )
            ),
            key=lambda row: (row.created_at or since, row.id),
        )

    async def renew_leases(
        self, frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> int:
        until = self.clock() + lease
        renewed = 0
        for job_id in job_ids:
            row = self.rows.get(job_id)
            if (
                row is not None
                and row.frontend_id == frontend_id
                and row.status not in TERMINAL_STATES
            ):
                self.rows[job_id] = attrs.evolve(row, lease_expires_at=until)
                renewed += 1
        return renewed

    async def reap_orphans(self, error: str) -> list[OperationRecord]:
        now = self.clock()
        reaped = []
        for job_id, row in list(self.rows.items()):
            if (
                row.status in TERMINAL_STATES
                or row.lease_expires_at is None
                or row.lease_expires_at >= now
            ):
                continue
            if row.cancel_requested:
                ended = attrs.evolve(row, status=OpState.CANCELLED, cancellable=False)
            else:
                ended = attrs.evolve(
                    row,
                    status=OpState.FAILED,
                    error=error.format(owner=row.frontend_id),
                    cancellable=False,
                )
            ended = attrs.evolve(ended, version=row.version + 1, updated_at=now)
            self.rows[job_id] = ended
            reaped.append(ended)
        return reaped

    async def request_cancel(self, job_id: str) -> OperationRecord | None:
        row = self.rows.get(job_id)
        if row is None:
            return None
        self.rows[job_id] = attrs.evolve(row, cancel_requested=True)
        return self.rows[job_id]

    async def cleanup(self, older_than: timedelta) -> int:
        before = self.clock() - older_than
        stale = [
            job_id
            for job_id, row in self.rows.items()
            if row.status in TERMINAL_STATES
            and row.updated_at is not None
            and row.updated_at < before
        ]
        for job_id in stale:
            del self.rows[job_id]
        return len(stale)
