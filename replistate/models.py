"""Operation state: statuses, per-node progress and the durable record.

The classes are immutable attrs classes. Field names are the JSON names of the wire
format that LocalAI's distributed mode uses, so the codec maps them one to one.
This module does no I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from datetime import datetime

import attrs

from replistate.errors import OperationFailed

__all__ = [
    "TERMINAL_STATES",
    "NodeProgress",
    "NodeState",
    "OpState",
    "OpStatus",
    "OpType",
    "OperationRecord",
    "error_text",
]


class NodeState(enum.StrEnum):
    """State of one worker node taking part in an operation."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    RUNNING_ON_WORKER = "running_on_worker"
    SUCCESS = "success"
    ERROR = "error"


class OpState(enum.StrEnum):
    """State of an operation, as stored in the `status` column."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the operation can never leave this state."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED})


class OpType(enum.StrEnum):
    """Kind of operation, also the `op` of an invalidation."""

    INSTALL = "install"
    DELETE = "delete"
    UPGRADE = "upgrade"


MAX_TEXT_LENGTH = 8192
"""Maximum length of an error or message text, in characters; longer text is cut.

A status must fit in one bus message (1 MiB by default on NATS), and an error
carrying a whole HTTP response body would not.
"""


def _cut(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and a write it always rejects would be
    # retried forever, so NUL becomes the replacement character everywhere.
    text = text.replace("\x00", "\ufffd")
    if len(text) <= MAX_TEXT_LENGTH:
        return text
    note = f" [cut from {len(text)} characters]"
    return text[: MAX_TEXT_LENGTH - len(note)] + note


def error_text(error: BaseException | str | None) -> str | None:
    """Convert an error of any type to the message string that crosses the wire.

    An exception becomes ``str(exc)``, or its class name when the message is empty,
    so a failure never looks like a success. An empty string means no error. Text
    over `MAX_TEXT_LENGTH` characters is cut, and NUL becomes U+FFFD, on every
    replica alike, so such text does not come back identical.

    Raises:
        TypeError: `error` is neither an exception, a string nor None.
    """
    if error is None:
        return None
    if isinstance(error, BaseException):
        return _cut(str(error) or type(error).__name__)
    if not isinstance(error, str):
        raise TypeError(
            f"invalid error {error!r}: pass an exception or a string, "
            f"not {type(error).__name__}"
        )
    return _cut(error) if error else None


FAILED_WITHOUT_TEXT = "failed without an error message"
"""Error text of a row stored as failed with no error, as other writers may leave."""


def _finite_percent(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"progress must be a finite percentage, got {value!r}")
    return value


def _require_aware(value: datetime | None) -> datetime | None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(
            f"naive datetime {value.isoformat()} rejected: pass a datetime with a "
            "time zone, such as datetime.now(timezone.utc)"
        )
    return value


@attrs.frozen(kw_only=True)
class NodeProgress:
    """Progress of one worker node. Sizes are human-readable strings ("2.1 GB")."""

    node_id: str
    node_name: str = ""
    status: NodeState = NodeState.QUEUED
    percentage: float = attrs.field(default=0.0, converter=_finite_percent)
    file_name: str = ""
    current: str = ""
    total: str = ""
    phase: str = ""
    error: str = ""


def _node_tuple(nodes: Iterable[NodeProgress]) -> tuple[NodeProgress, ...]:
    return tuple(nodes)


@attrs.frozen(kw_only=True)
class OpStatus:
    """Status of one operation as every replica shows it.

    `progress` is a percentage from 0 to 100. `error` accepts an exception or a
    string and keeps only its message text (see `error_text`). An operation is
    terminal once it is processed (completed, or failed when it has an error) or
    cancelled. An error on a status that is not processed is a recoverable one,
    such as a download being retried.
    """

    deletion: bool = False
    file_name: str = attrs.field(default="", converter=_cut)
    error: str | None = attrs.field(default=None, converter=error_text)
    processed: bool = False
    message: str = attrs.field(default="", converter=_cut)
    progress: float = attrs.field(default=0.0, converter=_finite_percent)
    file_size: str = attrs.field(default="", converter=_cut)
    downloaded_size: str = attrs.field(default="", converter=_cut)
    gallery_element_name: str = attrs.field(default="", converter=_cut)
    cancelled: bool = False
    cancellable: bool = False
    nodes: tuple[NodeProgress, ...] = attrs.field(default=(), converter=_node_tuple)

    @property
    def state(self) -> OpState:
        """The table state this status maps to."""
        if self.cancelled:
            return OpState.CANCELLED
        if self.processed:
            return OpState.FAILED if self.error is not None else OpState.COMPLETED
        if self.progress >= 100 or (
            self.nodes
            and any(node.status is NodeState.RUNNING_ON_WORKER for node in self.nodes)
        ):
            return OpState.PROCESSING
        if self.progress > 0 or self.downloaded_size:
            return OpState.DOWNLOADING
        return OpState.PENDING

    @property
    def terminal(self) -> bool:
        """Whether the operation completed, failed or was cancelled."""
        # The same as `state.terminal`, without building the state: this runs
        # for every status change.
        return self.cancelled or self.processed

    @property
    def exception(self) -> OperationFailed | None:
        """The error as an exception with the same text, or None."""
        return None if self.error is None else OperationFailed(self.error)

    def merged_with(self, update: OpStatus) -> OpStatus:
        """Return `update` applied over this status.

        An update without nodes keeps the nodes held here, and a non-empty node list
        replaces them. Every other field is taken from the update.
        """
        if update.nodes or not self.nodes:
            return update
        return attrs.evolve(update, nodes=self.nodes)

    def with_node(self, node: NodeProgress) -> OpStatus:
        """Return this status with one node's progress applied.

        The entry with the same `node_id` is replaced, or the node is appended. The
        node's percentage, file name, current and total sizes are mirrored into the
        aggregate fields, so clients that read only the aggregate see them too.
        """
        nodes = list(self.nodes)
        for index, held in enumerate(nodes):
            if held.node_id == node.node_id:
                nodes[index] = node
                break
        else:
            nodes.append(node)

        return attrs.evolve(
            self,
            nodes=nodes,
            progress=node.percentage,
            file_name=node.file_name or self.file_name,
            downloaded_size=node.current or self.downloaded_size,
            file_size=node.total or self.file_size,
        )


@attrs.frozen(kw_only=True)
class OperationRecord:
    """One row of the `gallery_operations` table.

    `frontend_id` is the replica that owns the operation. `version` grows with every
    status change. Timestamps must carry a time zone.
    """

    id: str
    gallery_element_name: str = ""
    cache_key: str = ""
    is_backend_op: bool = False
    op_type: OpType = OpType.INSTALL
    status: OpState = OpState.PENDING
    progress: float = 0.0
    message: str = ""
    error: str | None = attrs.field(default=None, converter=error_text)
    file_name: str = ""
    total_file_size: str = ""
    downloaded_file_size: str = ""
    frontend_id: str = ""
    cancellable: bool = False
    created_at: datetime | None = attrs.field(default=None, converter=_require_aware)
    updated_at: datetime | None = attrs.field(default=None, converter=_require_aware)
    version: int = 0
    lease_expires_at: datetime | None = attrs.field(
        default=None, converter=_require_aware
    )
    cancel_requested: bool = False

    @classmethod
    def from_status(
        cls,
        job_id: str,
        status: OpStatus,
        *,
        version: int = 0,
        cache_key: str = "",
        is_backend_op: bool = False,
        frontend_id: str = "",
    ) -> OperationRecord:
        """Build the row that stores `status` for `job_id`."""
        return cls(
            id=job_id,
            gallery_element_name=status.gallery_element_name,
            cache_key=cache_key,
            is_backend_op=is_backend_op,
            op_type=OpType.DELETE if status.deletion else OpType.INSTALL,
            status=status.state,
            progress=status.progress,
            message=status.message,
            error=status.error,
            file_name=status.file_name,
            total_file_size=status.file_size,
            downloaded_file_size=status.downloaded_size,
            frontend_id=frontend_id,
            cancellable=status.cancellable,
            version=version,
        )

    def to_status(self) -> OpStatus:
        """Rebuild the status this row stores. Node progress is not stored."""
        return OpStatus(
            deletion=self.op_type is OpType.DELETE,
            file_name=self.file_name,
            processed=self.status in (OpState.COMPLETED, OpState.FAILED),
            # A failed row without error text must still read as a failure.
            error=self.error
            if self.error or self.status is not OpState.FAILED
            else FAILED_WITHOUT_TEXT,
            message=self.message,
            progress=self.progress,
            file_size=self.total_file_size,
            downloaded_size=self.downloaded_file_size,
            gallery_element_name=self.gallery_element_name,
            cancelled=self.status is OpState.CANCELLED,
            cancellable=self.cancellable and not self.status.terminal,
        )
