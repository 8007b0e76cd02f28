"""The durable store interface.

A `GalleryStore` keeps one `OperationRecord` per job. Writes of a status are
conditional: a write applies only when its version is higher than the stored one and
the stored row is not terminal, so a late or repeated write never moves an operation
backwards or out of a terminal state.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from replistate.models import OperationRecord, OpStatus, OpType

__all__ = ["ACTIVE_WINDOW", "GalleryStore"]

ACTIVE_WINDOW = timedelta(hours=1)
"""Default window of `list_active`: an operation not updated for longer is stale."""


class GalleryStore(Protocol):
    """Durable record of operations, shared by every replica."""

    async def open(self) -> None:
        """Connect to the store.

        Raises:
            StoreError: the store cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release the connections. Idempotent."""
        ...

    async def ensure_schema(self) -> None:
        """Create the table and its indexes if missing. Safe to run concurrently."""
        ...

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        """Insert the row of a newly admitted job, or refresh its descriptive fields.

        On an existing row, a non-empty `cache_key` and a true `is_backend_op` are
        never overwritten, and neither are status, progress or version.
        """
        ...

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
        """Store `status` as version `version` of the job.

        Inserts the row when missing. Returns whether the write applied: it does
        not when the stored version is equal or higher, or the stored row is
        terminal. `cache_key`, `is_backend_op` and `op_type` fill in what a lost
        placeholder write would have stored: an existing cache key and backend
        flag are never overwritten, and `op_type` replaces the stored one when
        given.
        """
        ...

    async def get(self, job_id: str) -> OperationRecord | None:
        """Return the row of `job_id`, or None."""
        ...

    async def get_many(self, job_ids: list[str]) -> list[OperationRecord]:
        """Return the rows of the jobs in `job_ids` that exist, in no order."""
        ...

    async def list_active(
        self, window: timedelta = ACTIVE_WINDOW, *, include_failed: bool = False
    ) -> list[OperationRecord]:
        """Return the non-terminal rows updated within `window` of now.

        A row whose lease is still running is returned whatever its update time,
        because its owner is alive, even when its work reports nothing.

        With `include_failed`, failed rows updated within the window are returned
        too: replicas keep listing a failure with its error, so a replica that
        starts later must list it as well.
        """
        ...

    async def cleanup(self, older_than: timedelta) -> int:
        """Delete terminal rows not updated for `older_than`; return how many."""
        ...

    async def renew_leases(
        self, frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> int:
        """Extend to now plus `lease` the leases of the jobs `frontend_id` owns.

        Only non-terminal rows owned by `frontend_id` are renewed. Returns how
        many rows were.
        """
        ...

    async def reap_orphans(self, error: str) -> list[OperationRecord]:
        """End every non-terminal job whose owner's lease has expired.

        A job with a stored cancel request ends cancelled, any other ends failed
        with `error`, which may contain ``{owner}`` for the owner's id. The
        update is conditional, so when several replicas reap at once each job is
        ended by exactly one of them: the returned rows are those this call
        ended, with their new version. Rows without a lease are never reaped.
        """
        ...

    async def request_cancel(self, job_id: str) -> OperationRecord | None:
        """Store the intent to cancel `job_id`; return its row, or None if absent.

        The intent is stored on terminal rows too, where it has no effect.
        """
        ...
