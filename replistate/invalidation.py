"""Cache invalidations: reload hooks run on every replica, the originator included.

A replica publishes an invalidation when a change on disk or in a database means
peers must reload a derived cache, such as the list of installed models. Every
replica runs its hooks once per invalidation. The publisher runs them when its own
message comes back, or right after publishing on a bus without echo. In
standalone mode, or when the bus cannot take the message, the hooks run locally.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Awaitable, Callable

from replistate.bus.base import Channel, raised_by_callback
from replistate.codec import InvalidationMessage
from replistate.errors import BusError, CodecError
from replistate.models import OpType
from replistate.subjects import Subjects

__all__ = ["MAX_SEEN_INVALIDATIONS", "InvalidationHook", "Invalidations"]

logger = logging.getLogger(__name__)

InvalidationHook = Callable[[InvalidationMessage], Awaitable[None] | None]
"""Called with each invalidation received, this replica's own included."""

MAX_SEEN_INVALIDATIONS = 10_000
"""Invalidations with a version remembered to run their hooks only once. Those
of a job are forgotten when it leaves memory, so this bounds only a burst of
completions within one retention period."""

_SeenKey = tuple[str | OpType | int | None, ...]


class Invalidations:
    """The invalidation hooks of one replica, and the publishing of invalidations.

    Args:
        replica_id: this replica's id, sent as the origin of each message.
        subjects: the subject names.
        channel: the typed bus, or None in standalone mode.
    """

    def __init__(
        self, *, replica_id: str, subjects: Subjects, channel: Channel | None
    ) -> None:
        self.replica_id = replica_id
        self.subjects = subjects
        self.channel = channel
        self._model_hooks: list[InvalidationHook] = []
        self._backend_hooks: list[InvalidationHook] = []
        # Each seen key with the job it belongs to, if any, oldest first.
        self._seen: collections.OrderedDict[_SeenKey, str | None] = (
            collections.OrderedDict()
        )
        self._seen_by_job: dict[str, set[_SeenKey]] = {}

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
        job_id: str | None = None,
        version: int | None = None,
    ) -> None:
        """Tell every replica, this one included, to reload its models.

        Args:
            element: the model that changed, or None when the whole set changed.
            op: what happened to it.
            job_id: the operation that caused it.
            version: the status version of that operation.
        """
        await self._invalidate(
            self.subjects.invalidate_models, element, op, job_id, version
        )

    async def invalidate_backends(
        self,
        element: str | None = None,
        op: OpType | None = None,
        *,
        job_id: str | None = None,
        version: int | None = None,
    ) -> None:
        """Tell every replica, this one included, to reload its backends."""
        await self._invalidate(
            self.subjects.invalidate_backends, element, op, job_id, version
        )

    async def handle_invalidation(
        self, subject: str, message: InvalidationMessage
    ) -> None:
        """Run the hooks of the invalidation received on `subject`.

        An invalidation caused by an operation carries its job id and version, and
        one operation sends one. The same one seen twice, live and again from a
        resync, or replayed by the bus after a reconnect, runs the hooks once.
        """
        if subject == self.subjects.invalidate_models:
            hooks = self._model_hooks
        elif subject == self.subjects.invalidate_backends:
            hooks = self._backend_hooks
        else:
            return
        if message.version is not None:
            # The end of one operation is named by its job id and version. The
            # element is left out, because a resync's replay takes it from the
            # stored row, which may name it otherwise than the live message.
            key: _SeenKey
            if message.job_id is not None:
                key = (subject, message.job_id, message.op, message.version)
            else:
                key = (
                    subject,
                    message.origin,
                    message.element,
                    message.op,
                    message.version,
                )
            if key in self._seen:
                return
            self._remember(key, message.job_id)
        for hook in list(hooks):
            try:
                result = hook(message)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                if not raised_by_callback(exc):
                    raise
                logger.exception(
                    "invalidation hook %r failed on %r for element %r of job %r",
                    getattr(hook, "__qualname__", hook),
                    subject,
                    message.element,
                    message.job_id,
                )

    def forget_job(self, job_id: str) -> None:
        """Forget the invalidations of `job_id` seen so far, once the job left
        memory or a new run under the same id starts its versions again."""
        for key in self._seen_by_job.pop(job_id, ()):
            self._seen.pop(key, None)

    def _remember(self, key: _SeenKey, job_id: str | None) -> None:
        self._seen[key] = job_id
        if job_id is not None:
            self._seen_by_job.setdefault(job_id, set()).add(key)
        while len(self._seen) > MAX_SEEN_INVALIDATIONS:
            oldest, oldest_job = self._seen.popitem(last=False)
            if oldest_job is not None:
                keys = self._seen_by_job[oldest_job]
                keys.discard(oldest)
                if not keys:
                    del self._seen_by_job[oldest_job]

    async def _invalidate(
        self,
        subject: str,
        element: str | None,
        op: OpType | None,
        job_id: str | None,
        version: int | None,
    ) -> None:
        message = InvalidationMessage(
            element=element,
            op=op,
            origin=self.replica_id,
            job_id=job_id,
            version=version,
        )
        if self.channel is None:
            # Standalone: there is no echo, so run the hooks here.
            await self.handle_invalidation(subject, message)
            return
        try:
            await self.channel.publish(subject, message)
        except (BusError, CodecError) as exc:
            logger.warning(
                "invalidation of element %r not published on %r, running local "
                "hooks only: %s",
                element,
                subject,
                exc,
            )
            await self.handle_invalidation(subject, message)
            return
        if not getattr(self.channel.bus, "echo", True):
            # This replica's own message does not come back to it.
            await self.handle_invalidation(subject, message)
