"""JSON bodies of the operations API, shared by every web integration.

The shapes are those the LocalAI web UI polls: `GET /api/operations` returns
``{"operations": [...]}`` with one entry per OpCache entry.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import orjson

from replistate.codec import converter
from replistate.errors import BusError, InvalidIdError, StoreError
from replistate.models import OpState, OpStatus
from replistate.replica import Replica
from replistate.service import CancelOutcome

__all__ = [
    "cancel_response",
    "health_response",
    "job_response",
    "operation_entry",
    "operations_body",
    "operations_response",
]

logger = logging.getLogger(__name__)

_CANCEL_STATUS = {
    CancelOutcome.ACCEPTED: 202,
    CancelOutcome.TOO_LATE: 409,
    CancelOutcome.NOT_CANCELLABLE: 409,
    CancelOutcome.UNKNOWN: 404,
}


def operation_entry(
    cache_key: str, job_id: str, is_backend: bool, status: OpStatus | None
) -> dict[str, Any] | None:
    """Return the listing entry of one operation, or None when it is left out.

    Finished successes and cancellations are left out. An operation with no
    status yet is shown as queued.
    """
    if status is not None and (
        status.cancelled or (status.processed and status.error is None)
    ):
        return None
    current = status or OpStatus(message="queued")
    entry: dict[str, Any] = {
        "id": cache_key,
        "name": current.gallery_element_name or cache_key,
        "jobID": job_id,
        "progress": int(current.progress),
        "taskType": "deletion" if current.deletion else "installation",
        "isDeletion": current.deletion,
        "isBackend": is_backend,
        "isQueued": current.state is OpState.PENDING,
        "isCancelled": current.cancelled,
        "cancellable": current.cancellable,
        "message": current.message,
    }
    if current.error is not None:
        entry["error"] = current.error
    if current.nodes:
        entry["nodes"] = converter.unstructure(current.nodes)
    return entry


_cached_bodies: weakref.WeakKeyDictionary[Replica, tuple[tuple[int, int], bytes]] = (
    weakref.WeakKeyDictionary()
)


def operations_body(replica: Replica) -> bytes:
    """Return `operations_response` encoded as JSON bytes.

    The bytes are kept until the mirror or the OpCache changes, so the many
    clients that poll the list each second cost one encoding per change.
    """
    revision = (replica.operations.revision, replica.opcache.revision)
    cached = _cached_bodies.get(replica)
    if cached is not None and cached[0] == revision:
        return cached[1]
    body = orjson.dumps(operations_response(replica))
    _cached_bodies[replica] = (revision, body)
    return body


def operations_response(replica: Replica) -> dict[str, Any]:
    """Return the body of `GET /api/operations` from the replica's mirror."""
    operations = []
    for cache_entry in replica.opcache.entries():
        entry = operation_entry(
            cache_entry.cache_key,
            cache_entry.job_id,
            cache_entry.is_backend,
            replica.operations.get_status(cache_entry.job_id),
        )
        if entry is not None:
            operations.append(entry)
    return {"operations": operations}


async def job_response(replica: Replica, job_id: str) -> tuple[int, dict[str, Any]]:
    """Return HTTP status and body for the status of one job.

    The store is read when the mirror does not hold the job, so a poll that
    arrives before the start event still finds it.
    """
    try:
        status = await replica.operations.fetch_status(job_id)
    except InvalidIdError as exc:
        return 400, {"error": str(exc)}
    except StoreError as exc:
        logger.warning("status of job %r not read: %s", job_id, exc)
        return 503, {"jobID": job_id, "error": str(exc)}
    if status is None:
        return 404, {"error": f"job {job_id!r} not found"}
    body: dict[str, Any] = converter.unstructure(status)
    body["jobID"] = job_id
    body["state"] = status.state.value
    return 200, body


async def cancel_response(replica: Replica, job_id: str) -> tuple[int, dict[str, Any]]:
    """Request the cancel of `job_id`; return HTTP status and body.

    The status is 202 when the cancel was accepted, and 409 when the job is
    already terminal or cannot be cancelled. It is 404 when neither the mirror
    nor the store has the job, 400 for an id that cannot name a job, and 503 when
    the request could not be sent to the replica running the job.
    """
    try:
        outcome = await replica.operations.cancel(job_id)
    except InvalidIdError as exc:
        return 400, {"error": str(exc)}
    except (BusError, StoreError) as exc:
        logger.warning("cancel of job %r not requested: %s", job_id, exc)
        return 503, {"jobID": job_id, "error": str(exc)}
    return _CANCEL_STATUS[outcome], {"jobID": job_id, "outcome": outcome.value}


def health_response(replica: Replica) -> tuple[int, dict[str, Any]]:
    """Return 200 when the replica is ready, 503 otherwise, with the details."""
    ready = replica.ready
    body = {"ready": ready, "replica": replica.replica_id}
    return (200 if ready else 503), body
