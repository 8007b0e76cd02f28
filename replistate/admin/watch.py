"""`watch`: the messages on the bus, decoded, as they arrive.

Each message is classified by its subject (a job's progress or cancel, an OpCache
start or end, an invalidation, or another subject), then decoded with the codec
the replicas use. A payload the codec rejects is shown with the reason, as an
event of its own; watching goes on.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import attrs

from replistate import codec
from replistate.admin.command import CommandError, ExitCode, print_error
from replistate.admin.connections import open_bus, redact_url
from replistate.admin.render import (
    percent_text,
    printable,
    progress_bar,
    terminal_width,
    to_json,
)
from replistate.bus.base import validate_subject
from replistate.codec import (
    CancelMessage,
    InvalidationMessage,
    OpCacheEndMessage,
    OpCacheStartMessage,
    ProgressMessage,
    WireMessage,
)
from replistate.errors import CodecError
from replistate.subjects import Subjects, subject_matches, validate_job_id

__all__ = [
    "MAX_RAW_CHARACTERS",
    "BusEvent",
    "EventKind",
    "decode_event",
    "default_patterns",
    "event_line",
    "watch",
]

MAX_RAW_CHARACTERS: Final = 500
"""Maximum length of the payload excerpt shown for a message that is not decoded,
in characters."""

KIND_WIDTH: Final = 19
"""Width of the kind column in text output: the longest kind name."""

MAX_PENDING_EVENTS: Final = 10_000
"""Maximum number of received messages waiting to be printed. Further ones are
dropped and counted, so a slow output cannot make memory grow without bound."""

EVENT_BAR_WIDTH: Final = 22
"""Width of the progress bar of a progress event on a terminal, in characters."""


class EventKind(enum.StrEnum):
    """The kind of a message on the bus, from its subject."""

    PROGRESS = "progress"
    CANCEL = "cancel"
    OPCACHE_START = "opcache.start"
    OPCACHE_END = "opcache.end"
    INVALIDATE_MODELS = "invalidate.models"
    INVALIDATE_BACKENDS = "invalidate.backends"
    OTHER = "other"


_MESSAGE_TYPES: Final[dict[EventKind, type[WireMessage]]] = {
    EventKind.PROGRESS: ProgressMessage,
    EventKind.CANCEL: CancelMessage,
    EventKind.OPCACHE_START: OpCacheStartMessage,
    EventKind.OPCACHE_END: OpCacheEndMessage,
    EventKind.INVALIDATE_MODELS: InvalidationMessage,
    EventKind.INVALIDATE_BACKENDS: InvalidationMessage,
}


@attrs.frozen(kw_only=True)
class BusEvent:
    """One message received by `watch`.

    Attributes:
        time: when it was received, with a time zone.
        subject: the subject it arrived on.
        kind: the kind its subject names.
        job_id: the job it is about: from the subject for progress and cancel
            messages, from the payload for OpCache messages; None otherwise.
        decoded: the decoded payload, or None when it could not be decoded.
        invalid: why replicas reject the message, or None.
        raw: an excerpt of the payload when it was not decoded, or None.
    """

    time: datetime
    subject: str
    kind: EventKind
    job_id: str | None = None
    decoded: WireMessage | None = None
    invalid: str | None = None
    raw: str | None = None

    def document(self) -> dict[str, Any]:
        """Return the event as the JSON object `watch --json` prints."""
        decoded = self.decoded
        status = decoded.status if isinstance(decoded, ProgressMessage) else None
        return {
            "time": self.time.astimezone(UTC).isoformat(timespec="milliseconds"),
            "subject": self.subject,
            "kind": self.kind.value,
            "job_id": self.job_id,
            "state": status.state.value if status else None,
            "progress": status.progress if status else None,
            "message": status.message if status else None,
            "error": status.error if status else None,
            "origin": decoded.origin if decoded else None,
            "version": decoded.version if decoded else None,
            "payload": codec.converter.unstructure(decoded) if decoded else None,
            "invalid": self.invalid,
            "raw": self.raw,
        }


def _classify(subject: str, subjects: Subjects) -> EventKind:
    if subject == subjects.opcache_start:
        return EventKind.OPCACHE_START
    if subject == subjects.opcache_end:
        return EventKind.OPCACHE_END
    if subject == subjects.invalidate_models:
        return EventKind.INVALIDATE_MODELS
    if subject == subjects.invalidate_backends:
        return EventKind.INVALIDATE_BACKENDS
    if subjects.job_id_of(subject) is not None:
        kind = subject.rpartition(".")[2]
        return EventKind.PROGRESS if kind == "progress" else EventKind.CANCEL
    return EventKind.OTHER


def _excerpt(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) <= MAX_RAW_CHARACTERS:
        return text
    return f"{text[:MAX_RAW_CHARACTERS]}... [{len(data)} bytes]"


def decode_event(
    subject: str, data: bytes, subjects: Subjects, *, received: datetime
) -> BusEvent:
    """Classify and decode one message as replicas under `subjects` would.

    A payload the codec rejects gives an event with `invalid` set and an excerpt
    in `raw`, as does a progress or cancel payload naming another job than its
    subject, which replicas drop.
    """
    kind = _classify(subject, subjects)
    subject_job = subjects.job_id_of(subject)
    message_type = _MESSAGE_TYPES.get(kind)
    if message_type is None:
        return BusEvent(time=received, subject=subject, kind=kind, raw=_excerpt(data))
    try:
        decoded = codec.decode(data, message_type, max_size=None, subject=subject)
    except CodecError as exc:
        return BusEvent(
            time=received,
            subject=subject,
            kind=kind,
            job_id=subject_job,
            invalid=str(exc),
            raw=_excerpt(data),
        )

    job_id = subject_job
    invalid = None
    if isinstance(decoded, OpCacheStartMessage | OpCacheEndMessage):
        job_id = decoded.job_id
    payload_job = (
        decoded.job_id
        if isinstance(decoded, ProgressMessage)
        else decoded.id
        if isinstance(decoded, CancelMessage)
        else subject_job
    )
    if payload_job != subject_job:
        invalid = (
            f"job id {payload_job!r} in the payload differs from {subject_job!r} "
            "in the subject, so replicas drop it"
        )
    return BusEvent(
        time=received,
        subject=subject,
        kind=kind,
        job_id=job_id,
        decoded=decoded,
        invalid=invalid,
    )


def event_line(event: BusEvent, bar_width: int | None = None) -> str:
    """Return the text line `watch` prints for `event`.

    The line contains the local time, the kind, the job id or ``-``, the details
    of the message, and its origin replica and version. With `bar_width`, a
    progress event gets a progress bar that wide. Control characters are shown
    as escapes (see `printable`).
    """
    time = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    parts = [time, f"{event.kind.value:<{KIND_WIDTH}}", event.job_id or "-"]
    decoded = event.decoded
    if isinstance(decoded, ProgressMessage):
        status = decoded.status
        parts.append(status.state.value)
        if bar_width is not None:
            parts.append(progress_bar(status.progress, bar_width))
        parts.append(percent_text(status.progress).strip())
        if status.message:
            parts.append(status.message)
        if status.error is not None:
            parts.append(f"error: {status.error}")
    elif isinstance(decoded, OpCacheStartMessage | OpCacheEndMessage):
        if decoded.cache_key:
            parts.append(f"cache key {decoded.cache_key}")
        if decoded.is_backend:
            parts.append("(backend)")
    elif isinstance(decoded, InvalidationMessage):
        parts.append(f"element {decoded.element or '(all)'}")
        if decoded.op is not None:
            parts.append(f"op {decoded.op.value}")
    if decoded is not None and decoded.origin is not None:
        origin = f"from {decoded.origin}"
        if decoded.version is not None:
            origin += f" version {decoded.version}"
        parts.append(f"({origin})")
    if event.invalid is not None:
        parts.append(f"INVALID: {event.invalid}")
    if event.raw is not None:
        parts.append(f"payload: {event.raw}")
    return printable(" ".join(parts))


def default_patterns(subjects: Subjects, job_id: str | None = None) -> list[str]:
    """Return the patterns `watch` subscribes to when none is given.

    Every subject under both prefixes, or, for one job, its progress and cancel
    subjects and the OpCache subjects. The invalidation pattern is left out when
    the operations pattern covers it, so no message is received twice.
    """
    if job_id is not None:
        return [f"{subjects.prefix}.{job_id}.*", subjects.all_opcache]
    patterns = [f"{subjects.prefix}.>"]
    if not subject_matches(patterns[0], subjects.invalidate_models):
        patterns.append(f"{subjects.cache_prefix}.>")
    return patterns


async def watch(
    *,
    nats_url: str,
    prefix: str,
    cache_prefix: str,
    job_id: str | None = None,
    patterns: Sequence[str] = (),
    count: int | None = None,
    json_output: bool = False,
) -> ExitCode:
    """Print the messages on the bus as they arrive, until `count` or a signal.

    A message matching several patterns is received, and printed, once per
    pattern. Before the first event, one line on stderr names the patterns.

    Args:
        nats_url: the NATS URL.
        prefix: the operations subject prefix.
        cache_prefix: the invalidation subject prefix.
        job_id: show only the events of this job.
        patterns: NATS subject patterns to subscribe to instead of the
            defaults (see `default_patterns`).
        count: stop after printing this many events; None to go on.
        json_output: whether to print one JSON object per event and line.

    Raises:
        CommandError: a pattern is invalid (`ExitCode.USAGE`), or NATS cannot
            be reached.
        InvalidIdError: the job id or a prefix cannot be used in a subject.
    """
    subjects = Subjects(prefix, cache_prefix)
    if job_id is not None:
        validate_job_id(job_id)
    for pattern in patterns:
        try:
            validate_subject(pattern, pattern=True)
        except ValueError as exc:
            raise CommandError(str(exc), ExitCode.USAGE) from None
    chosen = list(patterns) or default_patterns(subjects, job_id)
    on_terminal = terminal_width(sys.stdout) is not None
    bar_width = EVENT_BAR_WIDTH if on_terminal and not json_output else None
    events: asyncio.Queue[BusEvent] = asyncio.Queue(MAX_PENDING_EVENTS)
    dropped = 0

    async def receive(subject: str, data: bytes) -> None:
        nonlocal dropped
        event = decode_event(subject, data, subjects, received=datetime.now(UTC))
        if job_id is not None and event.job_id != job_id:
            return
        try:
            events.put_nowait(event)
        except asyncio.QueueFull:
            dropped += 1

    async with open_bus(nats_url) as bus:
        subscriptions = [await bus.subscribe(pattern, receive) for pattern in chosen]
        try:
            await bus.flush()
            scope = f" for job {job_id}" if job_id is not None else ""
            print(
                printable(
                    f"watching {', '.join(chosen)}{scope} on "
                    f"{redact_url(nats_url)}; press Ctrl-C to stop"
                ),
                file=sys.stderr,
                flush=True,
            )
            printed = 0
            while count is None or printed < count:
                event = await events.get()
                line = (
                    to_json(event.document())
                    if json_output
                    else event_line(event, bar_width)
                )
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                printed += 1
                if dropped:
                    print_error(
                        f"{dropped} messages dropped because they arrived faster "
                        "than they could be printed"
                    )
                    dropped = 0
        finally:
            for subscription in subscriptions:
                await subscription.unsubscribe()
    return ExitCode.OK
