"""Exceptions raised by replistate.

Every exception derives from `ReplistateError`. Each subclass also derives from the
builtin exception a caller would catch for that kind of failure, and carries the ids
involved as attributes::

    ReplistateError
     +-- InvalidIdError (ValueError)          an id would change a subject's meaning
     +-- CodecError (ValueError)
     |    +-- EncodeError                     an object cannot be put on the wire
     |    +-- DecodeError                     bytes are not a valid message
     |    +-- PayloadTooLargeError            a payload is over the size limit
     +-- BusError (ConnectionError)           the message bus failed or is closed
     +-- StoreError (OSError)                 the durable store failed
     +-- OperationConflictError (ValueError)  a job id or cache key is taken
     +-- JobNotFoundError (LookupError)       the job is in neither mirror nor store
     +-- OperationFailed (RuntimeError)       the error text of a failed operation
     +-- NotStartedError (RuntimeError)       a replica was used before start()
     +-- CallTimeoutError (TimeoutError)      a blocking call outlasted its timeout
"""

from __future__ import annotations

__all__ = [
    "BusError",
    "CallTimeoutError",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "InvalidIdError",
    "JobNotFoundError",
    "NotStartedError",
    "OperationConflictError",
    "OperationFailed",
    "PayloadTooLargeError",
    "ReplistateError",
    "StoreError",
]


class ReplistateError(Exception):
    """Root of every exception that replistate raises."""


class InvalidIdError(ReplistateError, ValueError):
    """An id cannot be used as a subject token.

    Attributes:
        value: the rejected id.
        reason: why it was rejected.
    """

    def __init__(self, value: str, reason: str, *, kind: str = "id") -> None:
        self.value = value
        self.reason = reason
        excerpt = value if len(value) <= 80 else value[:60] + "..."
        super().__init__(f"invalid {kind} {excerpt!r}: {reason}")


class CodecError(ReplistateError, ValueError):
    """A message could not be encoded or decoded."""


class EncodeError(CodecError):
    """An object cannot be encoded, for example a naive datetime."""


class DecodeError(CodecError):
    """Bytes received are not a valid message of the expected type.

    Attributes:
        subject: the subject the bytes arrived on, when known.
    """

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        self.subject = subject
        super().__init__(message)


class PayloadTooLargeError(CodecError):
    """A payload, sent or received, is larger than the configured maximum.

    Attributes:
        size: the payload size in bytes.
        limit: the maximum in bytes.
        subject: the subject of the payload, when known.
    """

    def __init__(self, size: int, limit: int, *, subject: str | None = None) -> None:
        self.size = size
        self.limit = limit
        self.subject = subject
        super().__init__(
            f"payload of {size} bytes on {subject!r} is over the limit of {limit} bytes"
        )


class BusError(ReplistateError, ConnectionError):
    """The message bus failed, or was used while closed."""


class StoreError(ReplistateError, OSError):
    """The durable store failed."""


class OperationConflictError(ReplistateError, ValueError):
    """An operation cannot start: its job id is in use, or its key is busy.

    Attributes:
        cache_key: the cache key of the refused operation.
        job_id: the job that has the id or the key.
    """

    def __init__(self, message: str, cache_key: str, job_id: str) -> None:
        self.cache_key = cache_key
        self.job_id = job_id
        super().__init__(message)


class JobNotFoundError(ReplistateError, LookupError):
    """A job is in neither the mirror nor the store.

    Attributes:
        job_id: the job looked up.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class OperationFailed(ReplistateError, RuntimeError):
    """The error of a failed operation, rebuilt from its message text.

    Errors cross the wire as their message string, so any exception raised by the
    work of an operation comes back on every replica as this type, with identical
    text: ``str(OperationFailed(str(exc))) == str(exc)``.
    """


class NotStartedError(ReplistateError, RuntimeError):
    """A replica was used before `start()` finished or after `stop()`."""


class CallTimeoutError(ReplistateError, TimeoutError):
    """A blocking call into the event loop of a replica did not finish in time.

    Attributes:
        call: what was called, such as ``"cancel of job '...'"``.
        timeout: the time the call was allowed, in seconds.
    """

    def __init__(self, call: str, timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        super().__init__(
            f"{call} timed out after {timeout:g} s; pass a larger timeout, or check "
            "that the bus and the store respond"
        )
