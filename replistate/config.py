"""Settings of one replica, checked when they are made."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import attrs

from replistate.store.base import ACTIVE_WINDOW
from replistate.subjects import DEFAULT_CACHE_PREFIX, DEFAULT_PREFIX

__all__ = ["MAX_PERIOD", "MIN_PERIOD", "ReplicaConfig"]


def _new_replica_id() -> str:
    return f"replica-{uuid.uuid4().hex[:12]}"


def _non_empty(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


MIN_PERIOD = 0.01
"""Minimum lease, reap interval and resync interval, in seconds, because a loop
that wakes more often only burns CPU."""


MAX_PERIOD = 3650 * 24 * 3600.0
"""Maximum duration of any setting, in seconds: 3,650 days, far from the
overflow of a datetime plus a longer `timedelta`."""


def _seconds(
    minimum: float, *, duration: bool = False, optional: bool = False
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """Return a validator of a number of seconds, or with `duration` of a
    `timedelta`, from `minimum` to `MAX_PERIOD`; with `optional` None passes."""
    expected = "a timedelta" if duration else "a number of seconds"

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if duration:
            seconds = value.total_seconds() if isinstance(value, timedelta) else None
        else:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            seconds = value if number else None
        if seconds is None or not minimum <= seconds <= MAX_PERIOD:
            raise ValueError(
                f"invalid {attribute.name} {value!r}: expected {expected} from "
                f"{minimum:g} s to {MAX_PERIOD:.0f} s"
            )

    return check


@attrs.frozen(kw_only=True)
class ReplicaConfig:
    """Settings of one replica.

    Attributes:
        replica_id: unique for the life of the process; a random one by default.
        subject_prefix: prefix of the operation subjects.
        cache_prefix: prefix of the invalidation subjects.
        active_window: how recently a non-terminal operation must have been
            updated to be hydrated; older ones are taken as abandoned.
        max_payload: largest payload sent or accepted, in bytes; the bus's own
            limit when None.
        create_schema: whether `start` creates the store's table if missing.
        write_retry_max: maximum wait between two retries of a failed store
            write, in seconds.
        write_interval: seconds between two progress writes of one operation to
            the store; start and terminal writes are not delayed.
        lease: how long the lease on an owned operation lasts; the owner renews
            it every third of that. Once it expires, a peer ends the operation
            as failed because its owner was lost.
        reap_interval: seconds between two searches for such orphans.
        retention: seconds a finished operation stays in memory.
        history_size: how many recent results `operations.history` keeps.
        stop_grace_period: seconds `stop` gives owned work to end after its
            cancel; work still running then is marked failed and left behind.
        resync_interval: seconds between periodic resyncs with the store, None
            for none. A resync also follows each bus reconnect and each gap in
            the versions of a job.
        start_resync_delay: seconds after `start` when one resync runs, None for
            none. It finds an end the bus did not deliver while the new
            subscriptions took effect.
        sync_wait: seconds `start` waits, after hydrating, for the owners of the
            running jobs it read to publish their current status; None to not
            ask. The store has progress only as of the last coalesced write,
            so without it a replica that starts mid-operation shows an older
            progress than its peers until the next tick.
    """

    replica_id: str = attrs.field(factory=_new_replica_id, validator=_non_empty)
    subject_prefix: str = DEFAULT_PREFIX
    cache_prefix: str = DEFAULT_CACHE_PREFIX
    active_window: timedelta = attrs.field(
        default=ACTIVE_WINDOW, validator=_seconds(MIN_PERIOD, duration=True)
    )
    max_payload: int | None = None
    create_schema: bool = True
    write_interval: float = attrs.field(default=0.5, validator=_seconds(0))
    write_retry_max: float = attrs.field(default=5.0, validator=_seconds(MIN_PERIOD))
    resync_interval: float | None = attrs.field(
        default=30.0, validator=_seconds(MIN_PERIOD, optional=True)
    )
    start_resync_delay: float | None = attrs.field(
        default=1.0, validator=_seconds(0, optional=True)
    )
    sync_wait: float | None = attrs.field(
        default=0.5, validator=_seconds(0, optional=True)
    )
    lease: timedelta = attrs.field(
        default=timedelta(seconds=15), validator=_seconds(MIN_PERIOD, duration=True)
    )
    reap_interval: float = attrs.field(default=5.0, validator=_seconds(MIN_PERIOD))
    retention: float = attrs.field(default=300.0, validator=_seconds(0))
    history_size: int = 1000
    stop_grace_period: float = attrs.field(default=5.0, validator=_seconds(0))
