"""Subject names, and validation of the ids placed in them.

NATS splits a subject into tokens at each `.`, treats `*` and `>` as wildcards, and
cannot carry whitespace in a subject. An id placed in a subject with any of these
characters would change what the subject means: `a.b` would be two tokens, `*`
would address every job. Such ids are rejected before anything is published.
This module does no I/O.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from replistate.errors import InvalidIdError

__all__ = [
    "DEFAULT_CACHE_PREFIX",
    "DEFAULT_PREFIX",
    "MAX_TOKEN_LENGTH",
    "RESERVED_JOB_IDS",
    "Subjects",
    "subject_matches",
    "validate_job_id",
    "validate_token",
]

DEFAULT_PREFIX: Final = "gallery"
"""Prefix of the operation subjects, the one LocalAI's distributed mode uses."""

DEFAULT_CACHE_PREFIX: Final = "cache.invalidate"
"""Prefix of the invalidation subjects."""

MAX_TOKEN_LENGTH: Final = 256
"""Maximum length of an id in a subject, in characters.

nats-server closes a connection whose protocol line is over 4096 bytes, so a
subject built from a longer id would cost the replica its connection.
"""

_FORBIDDEN = re.compile(r"[.*>\s\x00-\x1f\x7f-\x9f]")


def validate_token(value: str, *, label: str = "id") -> str:
    """Return `value` unchanged if it is safe as one subject token.

    Raises:
        InvalidIdError: `value` is empty, not a string, or contains `.`, `*`, `>`,
            whitespace or a control character. The error names the value.
    """
    if not isinstance(value, str):
        raise InvalidIdError(repr(value), f"{label} must be a string")
    if not value:
        raise InvalidIdError(value, f"{label} must not be empty")
    if len(value) > MAX_TOKEN_LENGTH:
        raise InvalidIdError(
            value,
            f"{label} is {len(value)} characters long, over the limit of "
            f"{MAX_TOKEN_LENGTH}",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidIdError(
            value, f"{label} is not valid Unicode text (it has a lone surrogate)"
        ) from None
    found = _FORBIDDEN.search(value)
    if found is not None:
        raise InvalidIdError(
            value,
            f"{label} contains {found.group()!r} at index {found.start()}, which "
            "would change the meaning of a subject; use an id without '.', '*', "
            "'>', whitespace or control characters",
        )
    return value


RESERVED_JOB_IDS: Final = frozenset({"opcache"})
"""Tokens that name other subjects under the prefix, so no job may use them."""


def validate_job_id(job_id: str) -> str:
    """Return `job_id` unchanged if it can name a job in a subject.

    Raises:
        InvalidIdError: `job_id` fails `validate_token`, or is a token reserved for
            other subjects under the prefix, such as ``opcache``.
    """
    validate_token(job_id, label="job id")
    if job_id in RESERVED_JOB_IDS:
        raise InvalidIdError(
            job_id, "job id is reserved for the OpCache subjects; use another id"
        )
    return job_id


def _validate_prefix(value: str, label: str) -> str:
    for token in value.split("."):
        try:
            validate_token(token, label="token")
        except InvalidIdError as exc:
            raise InvalidIdError(value, exc.reason, kind=label) from None
    return value


def _check_prefix(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    _validate_prefix(value, attribute.name)


@attrs.frozen
class Subjects:
    """Builders for every subject replistate publishes or subscribes to.

    Args:
        prefix: the operations prefix, one or more tokens joined by `.`.
        cache_prefix: the invalidation prefix.
    """

    prefix: str = attrs.field(default=DEFAULT_PREFIX, validator=_check_prefix)
    cache_prefix: str = attrs.field(
        default=DEFAULT_CACHE_PREFIX, validator=_check_prefix
    )

    def progress(self, job_id: str) -> str:
        """Return the subject of status changes of `job_id`."""
        return f"{self.prefix}.{validate_job_id(job_id)}.progress"

    def cancel(self, job_id: str) -> str:
        """Return the subject of cancel requests for `job_id`."""
        return f"{self.prefix}.{validate_job_id(job_id)}.cancel"

    @property
    def all_progress(self) -> str:
        """Pattern matching the progress subject of every job."""
        return f"{self.prefix}.*.progress"

    @property
    def all_cancel(self) -> str:
        """Pattern matching the cancel subject of every job."""
        return f"{self.prefix}.*.cancel"

    @property
    def opcache_start(self) -> str:
        """Subject on which a replica announces a new OpCache entry."""
        return f"{self.prefix}.opcache.start"

    @property
    def opcache_end(self) -> str:
        """Subject on which a replica announces a removed OpCache entry."""
        return f"{self.prefix}.opcache.end"

    @property
    def all_opcache(self) -> str:
        """Pattern matching both OpCache subjects, so one subscription receives
        them in publication order."""
        return f"{self.prefix}.opcache.*"

    @property
    def sync(self) -> str:
        """Subject on which a starting replica requests owners' current statuses.

        It has two tokens, so it matches neither a job's progress or cancel
        subject nor the OpCache subjects, the ones LocalAI peers subscribe to.
        """
        return f"{self.prefix}.sync"

    @property
    def invalidate_models(self) -> str:
        """Subject telling peers to reload their model list."""
        return f"{self.cache_prefix}.models"

    @property
    def invalidate_backends(self) -> str:
        """Subject telling peers to reload their backend list."""
        return f"{self.cache_prefix}.backends"

    def job_id_of(self, subject: str) -> str | None:
        """Return the job id of a progress or cancel subject, or None."""
        head, _, rest = subject.partition(f"{self.prefix}.")
        if head or not rest:
            return None
        job_id, _, kind = rest.partition(".")
        if kind not in ("progress", "cancel") or job_id == "opcache":
            return None
        return job_id


def subject_matches(pattern: str, subject: str) -> bool:
    """Return whether `subject` matches `pattern` under NATS rules.

    `*` matches exactly one token and `>`, only as the last token, matches one or
    more tokens. Tokens are compared exactly, case included.
    """
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return index == len(pattern_tokens) - 1 and len(subject_tokens) > index
        if index >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[index]:
            return False
    return len(pattern_tokens) == len(subject_tokens)
