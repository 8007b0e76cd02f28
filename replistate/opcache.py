"""OpCache: which job acts on which cache key, on every replica.

The replica that admits a job maps its cache key (``gallery@model-a``) to the job id
and announces it on `<prefix>.opcache.start`; removing the job announces
`<prefix>.opcache.end`. Each change is applied to memory first, then published, then
written to the store, and no lock is held across the I/O.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import attrs

from replistate.bus.base import Channel
from replistate.codec import OpCacheEndMessage, OpCacheStartMessage
from replistate.errors import BusError, CodecError, StoreError
from replistate.models import OperationRecord, OpType
from replistate.store.base import GalleryStore
from replistate.subjects import Subjects, validate_job_id

__all__ = ["OpCache", "OpCacheEntry"]

logger = logging.getLogger(__name__)

MAX_ENDED_JOBS = 10_000
"""Ended jobs remembered to ignore their late start events, at about 100 bytes each."""


def _job_id(entry: OpCacheEntry) -> str:
    return entry.job_id


@attrs.frozen
class OpCacheEntry:
    """One mapping of a cache key to the job acting on it."""

    cache_key: str
    job_id: str
    is_backend: bool = False


class OpCache:
    """The cache key to job map, mirrored on every replica.

    Args:
        replica_id: this replica's id, sent as the origin of each message.
        subjects: the subject names.
        channel: the typed bus, or None in standalone mode.
        store: the durable store, or None in standalone mode.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        subjects: Subjects,
        channel: Channel | None = None,
        store: GalleryStore | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.subjects = subjects
        self.channel = channel
        self.store = store
        self._by_key: dict[str, OpCacheEntry] = {}
        self._key_by_job: dict[str, str] = {}
        self.revision = 0
        """Grows with every change of the entries, so readers can cache."""
        # Jobs whose entry was removed, oldest first, so a start event or a row
        # that arrives after the end cannot bring the entry back.
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.is_active: Callable[[str], bool] = lambda job_id: True
        """Tells whether a job may still be running; set by the replica."""
        self.on_displaced: Callable[[str, str, str], None] | None = None
        """Called with loser, winner and key when two running jobs claim a key."""

    async def set(
        self,
        cache_key: str,
        job_id: str,
        *,
        element_name: str = "",
        op_type: OpType = OpType.INSTALL,
        version: int | None = None,
    ) -> None:
        """Map `cache_key` to `job_id` here, on every peer and in the store.

        `version` is the job's status version, sent along for ordering.
        """
        await self._set(cache_key, job_id, False, element_name, op_type, version)

    async def set_backend(
        self,
        cache_key: str,
        job_id: str,
        *,
        element_name: str = "",
        op_type: OpType = OpType.INSTALL,
        version: int | None = None,
    ) -> None:
        """Map `cache_key` to `job_id` and flag it as a backend operation."""
        await self._set(cache_key, job_id, True, element_name, op_type, version)

    async def delete_job(self, job_id: str, *, version: int | None = None) -> bool:
        """Remove the entry of `job_id` here and on every peer.

        Returns whether this replica held an entry for the job. The end event is
        published either way, so peers that still hold one drop it.

        Raises:
            InvalidIdError: `job_id` cannot name a job.
        """
        validate_job_id(job_id)
        entry = self._remove(job_id)
        message = OpCacheEndMessage(
            job_id=job_id,
            cache_key=entry.cache_key if entry else "",
            is_backend=entry.is_backend if entry else False,
            origin=self.replica_id,
            version=version,
        )
        await self._publish(self.subjects.opcache_end, message, job_id)
        return entry is not None

    def get(self, cache_key: str) -> str | None:
        """Return the job acting on `cache_key`, or None."""
        entry = self._by_key.get(cache_key)
        return entry.job_id if entry else None

    def get_by_job(self, job_id: str) -> OpCacheEntry | None:
        """Return the entry of `job_id`, or None."""
        cache_key = self._key_by_job.get(job_id)
        return self._by_key.get(cache_key) if cache_key is not None else None

    def is_backend(self, cache_key: str) -> bool:
        """Return whether the job on `cache_key` is a backend operation."""
        entry = self._by_key.get(cache_key)
        return entry.is_backend if entry else False

    def entries(self) -> list[OpCacheEntry]:
        """Return every entry, in admission order."""
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, cache_key: object) -> bool:
        return cache_key in self._by_key

    def restore(self, entry: OpCacheEntry) -> None:
        """Put an entry read from the store into memory, without publishing.

        An entry of a job that already ended here is ignored.
        """
        if entry.job_id not in self._ended:
            self._put(entry)

    def discard(self, job_id: str) -> OpCacheEntry | None:
        """Remove the entry of `job_id` here only, without publishing."""
        return self._remove(job_id)

    async def handle_start(self, subject: str, message: OpCacheStartMessage) -> None:
        """Apply a peer's start event, unless the job already ended here.

        Our own echo is already applied.
        """
        if message.origin == self.replica_id or message.job_id in self._ended:
            return
        self._put(OpCacheEntry(message.cache_key, message.job_id, message.is_backend))

    async def handle_end(self, subject: str, message: OpCacheEndMessage) -> None:
        """Apply a peer's end event. Our own echo is already applied."""
        if message.origin == self.replica_id:
            return
        self._remove(message.job_id)

    async def _set(
        self,
        cache_key: str,
        job_id: str,
        is_backend: bool,
        element_name: str,
        op_type: OpType,
        version: int | None,
    ) -> None:
        validate_job_id(job_id)
        if not cache_key:
            raise ValueError(f"missing cache key for job {job_id!r}")
        self._ended.pop(job_id, None)
        self._put(OpCacheEntry(cache_key, job_id, is_backend))

        message = OpCacheStartMessage(
            job_id=job_id,
            cache_key=cache_key,
            is_backend=is_backend,
            origin=self.replica_id,
            version=version,
        )
        await self._publish(self.subjects.opcache_start, message, job_id)
        if self.store is not None:
            record = OperationRecord(
                id=job_id,
                gallery_element_name=element_name,
                cache_key=cache_key,
                is_backend_op=is_backend,
                op_type=op_type,
                frontend_id=self.replica_id,
                cancellable=True,
            )
            try:
                await self.store.upsert_placeholder(record)
            except StoreError as exc:
                # NOTE: the placeholder is not retried, so a peer that starts
                # during a store outage lists this job only from the bus.
                logger.warning("placeholder for job %r not stored: %s", job_id, exc)

    def _put(self, entry: OpCacheEntry) -> None:
        replaced = self._by_key.get(entry.cache_key)
        if replaced is not None and replaced.job_id != entry.job_id:
            if self.is_active(replaced.job_id) and self.is_active(entry.job_id):
                # Two replicas started jobs on one key at once. Every replica keeps
                # the larger job id, whatever order the starts arrive in.
                winner, loser = (
                    max(replaced, entry, key=_job_id),
                    min(replaced, entry, key=_job_id),
                )
                logger.warning(
                    "jobs %r and %r both claim cache key %r: job %r keeps it",
                    replaced.job_id,
                    entry.job_id,
                    entry.cache_key,
                    winner.job_id,
                )
                if self.on_displaced is not None:
                    self.on_displaced(loser.job_id, winner.job_id, entry.cache_key)
                if winner is replaced:
                    return
            self._key_by_job.pop(replaced.job_id, None)
        previous_key = self._key_by_job.get(entry.job_id)
        if previous_key is not None and previous_key != entry.cache_key:
            self._by_key.pop(previous_key, None)
        self._by_key[entry.cache_key] = entry
        self._key_by_job[entry.job_id] = entry.cache_key
        self.revision += 1

    def _remove(self, job_id: str) -> OpCacheEntry | None:
        self._ended[job_id] = None
        self._ended.move_to_end(job_id)
        while len(self._ended) > MAX_ENDED_JOBS:
            self._ended.popitem(last=False)
        cache_key = self._key_by_job.pop(job_id, None)
        if cache_key is None:
            return None
        self.revision += 1
        return self._by_key.pop(cache_key, None)

    async def _publish(self, subject: str, message: object, job_id: str) -> None:
        if self.channel is None:
            return
        try:
            await self.channel.publish(subject, message)
        except (BusError, CodecError) as exc:
            logger.warning(
                "OpCache event for job %r not published on %r: %s",
                job_id,
                subject,
                exc,
            )
