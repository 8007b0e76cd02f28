"""Wire messages and their JSON encoding.

Each message type is the payload of one family of subjects. The JSON names are those
of LocalAI's distributed mode. replistate adds `origin` (the publishing replica),
`version` (per operation, growing with each change) and `schema`. Decoders ignore
keys they do not know, so Go peers read replistate messages and the reverse.

Decoding is strict about types: a string where a bool belongs is rejected instead
of being coerced. This module does no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias, TypeVar

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import OrjsonConverter
from cattrs.preconf.orjson import make_converter as _make_orjson_converter

from replistate.errors import DecodeError, EncodeError, PayloadTooLargeError
from replistate.models import (
    NodeProgress,
    NodeState,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "SCHEMA_VERSION",
    "CancelMessage",
    "InvalidationMessage",
    "OpCacheEndMessage",
    "OpCacheStartMessage",
    "ProgressMessage",
    "SyncRequestMessage",
    "WireMessage",
    "converter",
    "decode",
    "encode",
    "make_converter",
]

SCHEMA_VERSION: Final = 1
"""Version of replistate's additions to the payloads."""

DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
"""Largest payload accepted, in bytes: the default `max_payload` of nats-server."""

UNKNOWN_ERROR_TEXT: Final = "unknown error: the sender encoded the error without text"
"""Error text for a Go peer that encoded an `error` value as a JSON object."""


@attrs.frozen(kw_only=True)
class ProgressMessage:
    """Payload of `<prefix>.<job_id>.progress`: a status change of one operation."""

    job_id: str
    status: OpStatus
    origin: str | None = None
    version: int | None = None
    schema: int = SCHEMA_VERSION


@attrs.frozen(kw_only=True)
class CancelMessage:
    """Payload of `<prefix>.<job_id>.cancel`: a request to cancel the operation."""

    id: str
    origin: str | None = None
    version: int | None = None
    schema: int = SCHEMA_VERSION


@attrs.frozen(kw_only=True)
class OpCacheStartMessage:
    """Payload of `<prefix>.opcache.start`: a cache key now maps to a job."""

    job_id: str
    cache_key: str
    is_backend: bool
    origin: str | None = None
    version: int | None = None
    schema: int = SCHEMA_VERSION


@attrs.frozen(kw_only=True)
class OpCacheEndMessage:
    """Payload of `<prefix>.opcache.end`: the entry of a job was removed."""

    job_id: str
    cache_key: str = ""
    is_backend: bool = False
    origin: str | None = None
    version: int | None = None
    schema: int = SCHEMA_VERSION


@attrs.frozen(kw_only=True)
class SyncRequestMessage:
    """Payload of `<prefix>.sync`, replistate's own subject: a request from a
    replica that just hydrated for the owners to publish their jobs' statuses.

    The store has progress only as of the last coalesced write, so a replica
    that starts mid-operation would otherwise show an older progress than its
    peers until the next tick.
    """

    origin: str
    schema: int = SCHEMA_VERSION


@attrs.frozen(kw_only=True)
class InvalidationMessage:
    """Payload of `cache.invalidate.<kind>`: peers must reload a cache.

    Without `element` the whole set changed. An `op` of `delete` means peers must
    drop the element. `job_id` and `version` are those of the operation that
    caused it, if any.
    """

    element: str | None = None
    op: OpType | None = None
    origin: str | None = None
    job_id: str | None = None
    version: int | None = None
    schema: int = SCHEMA_VERSION


WireMessage: TypeAlias = (
    ProgressMessage
    | CancelMessage
    | OpCacheStartMessage
    | OpCacheEndMessage
    | InvalidationMessage
)
M = TypeVar("M")


def _strict(kind: type[Any], *accepted: type[Any]) -> Callable[[Any, Any], Any]:
    """Return a structure hook taking only values of the `accepted` JSON types.

    A bool is never taken for a number. The common case, a value of exactly
    `kind`, returns at the first test: this hook runs for every field of every
    message, and the decode profile was dominated by it.
    """

    def structure(value: Any, _: Any) -> Any:
        value_type = type(value)
        if value_type is kind:
            return value
        if value_type is bool or value_type not in accepted:
            raise TypeError(
                f"expected {kind.__name__}, got {value_type.__name__} {value!r}"
            )
        return kind(value)

    return structure


def _optional(structure: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Return a hook taking null or what `structure` takes."""

    def structure_optional(value: Any, kind: Any) -> Any:
        return None if value is None else structure(value, kind)

    return structure_optional


def _structure_enum(value: Any, cl: type[enum.Enum]) -> enum.Enum:
    if not isinstance(value, str):
        raise TypeError(f"expected a string for {cl.__name__}, got {value!r}")
    try:
        return cl(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in cl)
        raise ValueError(f"{value!r} is not one of {allowed}") from None


def _structure_error(value: Any, _: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        # Go's encoding/json writes an `error` interface value as `{}`: the text is
        # lost, but the operation still failed.
        return UNKNOWN_ERROR_TEXT
    raise TypeError(f"expected an error string, got {type(value).__name__}")


def _nodes_hook(conv: OrjsonConverter) -> Callable[[Any, Any], Any]:
    node_list = tuple[NodeProgress, ...]
    structure_list = conv.get_structure_hook(node_list)

    def structure(value: Any, _: Any) -> tuple[NodeProgress, ...]:
        # A Go peer without `omitempty` writes an empty node list as null.
        if value is None:
            return ()
        if not isinstance(value, list):
            raise TypeError(f"expected a list of nodes, got {type(value).__name__}")
        nodes: tuple[NodeProgress, ...] = structure_list(value, node_list)
        return nodes

    return structure


def _unstructure_datetime(value: datetime) -> str:
    if value.utcoffset() is None:
        raise EncodeError(
            f"naive datetime {value.isoformat()} cannot be encoded: give it a time zone"
        )
    return value.astimezone(UTC).isoformat()


def _structure_datetime(value: Any, _: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.utcoffset() is None:
        raise ValueError(
            f"naive timestamp {value!r} rejected: it has no UTC offset, so send "
            "ISO 8601 with an offset such as +00:00"
        )
    return parsed


def make_converter() -> OrjsonConverter:
    """Build the converter for every wire type, with strict primitive types."""
    conv = _make_orjson_converter(forbid_extra_keys=False)
    conv.register_structure_hook(bool, _strict(bool, bool))
    conv.register_structure_hook(int, _strict(int, int))
    conv.register_structure_hook(float, _strict(float, int, float))
    conv.register_structure_hook(str, _strict(str, str))
    for kind, accepted in ((str, (str,)), (int, (int,))):
        conv.register_structure_hook(kind | None, _optional(_strict(kind, *accepted)))
    # Each enum gets its own hook, because the `str` hook would also match StrEnums.
    for enum_type in (NodeState, OpState, OpType):
        conv.register_structure_hook(enum_type, _structure_enum)
    conv.register_unstructure_hook(datetime, _unstructure_datetime)
    conv.register_structure_hook(datetime, _structure_datetime)

    omit_empty = override(omit_if_default=True)
    conv.register_unstructure_hook(
        NodeProgress,
        make_dict_unstructure_fn(
            NodeProgress,
            conv,
            file_name=omit_empty,
            current=omit_empty,
            total=omit_empty,
            phase=omit_empty,
            error=omit_empty,
        ),
    )
    conv.register_unstructure_hook(
        OpStatus,
        make_dict_unstructure_fn(OpStatus, conv, error=omit_empty, nodes=omit_empty),
    )
    conv.register_structure_hook(
        OpStatus,
        make_dict_structure_fn(
            OpStatus,
            conv,
            error=override(struct_hook=_structure_error),
            nodes=override(struct_hook=_nodes_hook(conv)),
        ),
    )
    for optional in (ProgressMessage, CancelMessage, OpCacheStartMessage):
        conv.register_unstructure_hook(
            optional,
            make_dict_unstructure_fn(
                optional,
                conv,
                _cattrs_omit_if_default=True,
                **_keep_required(optional),
            ),
        )
    conv.register_unstructure_hook(
        InvalidationMessage,
        make_dict_unstructure_fn(
            InvalidationMessage,
            conv,
            _cattrs_omit_if_default=True,
            schema=override(omit_if_default=False),
        ),
    )
    conv.register_unstructure_hook(
        OpCacheEndMessage,
        make_dict_unstructure_fn(
            OpCacheEndMessage,
            conv,
            origin=omit_empty,
            version=omit_empty,
            schema=override(omit_if_default=False),
        ),
    )
    conv.register_unstructure_hook(
        OperationRecord, make_dict_unstructure_fn(OperationRecord, conv)
    )
    return conv


def _keep_required(cls: type[Any]) -> dict[str, Any]:
    """Return overrides that keep every field except the optional `origin` and
    `version`, so a payload always has the keys Go peers expect."""
    keep = override(omit_if_default=False)
    return {
        field.name: keep
        for field in attrs.fields(cls)
        if field.name not in ("origin", "version")
    }


converter: Final = make_converter()
"""The converter that `encode` and `decode` use."""


def encode(message: object) -> bytes:
    """Encode a wire message or a model object as JSON bytes.

    Raises:
        EncodeError: the object contains a value JSON cannot carry, such as a naive
            datetime.
    """
    try:
        return converter.dumps(message)
    except EncodeError:
        raise
    except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
        raise EncodeError(f"cannot encode {type(message).__name__}: {exc}") from exc


MAX_DETAIL_CHARACTERS: Final = 200
"""Maximum length of the description of one field's error, so a huge value in a
hostile payload does not make a huge log line."""


def _describe(exc: BaseException, kind: type | None) -> str:
    """Describe one field's error with the hook's own message when it has one,
    because cattrs alone names only the expected type."""
    own = str(exc)
    if not isinstance(exc, (ValueError, TypeError)) or not own:
        return cattrs.v.format_exception(exc, kind)
    if len(own) > MAX_DETAIL_CHARACTERS:
        own = f"{own[:MAX_DETAIL_CHARACTERS]}... [{len(own)} characters]"
    return f"invalid value: {own}"


def decode(
    data: bytes,
    message_type: type[M],
    *,
    max_size: int | None = DEFAULT_MAX_PAYLOAD,
    subject: str | None = None,
) -> M:
    """Decode JSON bytes as `message_type`.

    Args:
        data: the payload.
        message_type: the attrs class expected.
        max_size: the largest payload accepted, in bytes; None for no limit.
        subject: the subject the bytes arrived on, used in error messages.

    Raises:
        PayloadTooLargeError: `data` is longer than `max_size`.
        DecodeError: `data` is not JSON, not an object, or has a missing or
            wrongly typed field. The message names the field.
    """
    if max_size is not None and len(data) > max_size:
        raise PayloadTooLargeError(len(data), max_size, subject=subject)
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"payload is not JSON: {exc}", subject=subject) from None
    if not isinstance(raw, dict):
        raise DecodeError(
            f"payload is a JSON {type(raw).__name__}, expected an object",
            subject=subject,
        )
    try:
        return converter.structure(raw, message_type)
    except Exception as exc:  # cattrs raises several types, grouped or plain
        details = (
            "; ".join(cattrs.transform_error(exc, format_exception=_describe))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise DecodeError(
            f"invalid {message_type.__name__}: {details}", subject=subject
        ) from None
