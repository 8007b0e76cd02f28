"""Unit tests of the wire codec.

The JSON files in tests/vectors/ were written by hand from the wire format of
LocalAI's distributed mode, not produced by the encoder. They check that replistate
reads what a Go peer sends, and that a Go peer can read what replistate sends back.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replistate import codec
from replistate.codec import (
    DEFAULT_MAX_PAYLOAD,
    CancelMessage,
    InvalidationMessage,
    OpCacheEndMessage,
    OpCacheStartMessage,
    ProgressMessage,
)
from replistate.errors import (
    CodecError,
    DecodeError,
    EncodeError,
    OperationFailed,
    PayloadTooLargeError,
)
from replistate.models import (
    NodeProgress,
    NodeState,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
)

VECTORS = Path(__file__).parent / "vectors"

JOB_ID = "3f2b8c1e-7a4d-4e2b-9c1a-5d6e7f809a1b"
CACHE_JOB_ID = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"


class DownloadError(Exception):
    """An application exception, as the work of an operation would raise."""


def load_vector(name: str) -> tuple[bytes, dict[str, Any]]:
    """Return the raw bytes of a golden vector and the object they parse to."""
    data = (VECTORS / name).read_bytes()
    parsed = json.loads(data)
    assert isinstance(parsed, dict)
    return data, parsed


def reencode(message: object) -> dict[str, Any]:
    """Encode `message` and parse the JSON back into plain Python objects."""
    parsed = json.loads(codec.encode(message))
    assert isinstance(parsed, dict)
    return parsed


# Golden vectors: what each one decodes to.


def test_progress_plain_vector_decodes() -> None:
    data, _ = load_vector("progress_plain.json")

    message = codec.decode(data, ProgressMessage)

    assert message.job_id == JOB_ID
    assert message.origin is None
    assert message.version is None
    assert message.status.file_name == "llama-3.2-1b-instruct-q4_k_m.gguf"
    assert message.status.progress == 42.5
    assert message.status.file_size == "2.1 GB"
    assert message.status.downloaded_size == "912.3 MB"
    assert message.status.gallery_element_name == "localai@llama-3.2-1b-instruct"
    assert message.status.cancellable is True
    assert message.status.processed is False
    assert message.status.error is None
    assert message.status.nodes == ()
    assert message.status.state is OpState.DOWNLOADING


def test_progress_failed_vector_decodes() -> None:
    data, _ = load_vector("progress_failed_plain.json")

    message = codec.decode(data, ProgressMessage)

    assert message.status.error == "download failed: connection reset"
    assert message.status.processed is True
    assert message.status.progress == 0.0
    assert message.status.downloaded_size == "1.3 GB"
    assert message.status.state is OpState.FAILED
    assert str(message.status.exception) == "download failed: connection reset"


def test_progress_nodes_vector_decodes() -> None:
    data, _ = load_vector("progress_nodes.json")

    message = codec.decode(data, ProgressMessage)

    assert message.status.nodes == (
        NodeProgress(
            node_id="worker-1",
            node_name="gpu-box-1",
            status=NodeState.DOWNLOADING,
            percentage=37.5,
            file_name="whisper-base.bin",
            current="53.2 MB",
            total="142 MB",
            phase="download",
        ),
        NodeProgress(
            node_id="worker-2",
            node_name="gpu-box-2",
            status=NodeState.QUEUED,
            percentage=0.0,
        ),
    )
    assert message.status.progress == 37.5


def test_progress_replistate_vector_decodes() -> None:
    data, _ = load_vector("progress_replistate.json")

    message = codec.decode(data, ProgressMessage)

    assert message.job_id == "c0ffee00-1234-4abc-8def-000000000001"
    assert message.origin == "replica-a"
    assert message.version == 12
    assert message.schema == 1
    assert message.status.nodes[0].status is NodeState.RUNNING_ON_WORKER
    assert message.status.nodes[0].phase == "load"
    assert message.status.state is OpState.PROCESSING


def test_cancel_vector_decodes() -> None:
    data, _ = load_vector("cancel_plain.json")

    message = codec.decode(data, CancelMessage)

    assert message.id == JOB_ID
    assert message.origin is None
    assert message.version is None


def test_opcache_start_vector_decodes() -> None:
    data, _ = load_vector("opcache_start.json")

    message = codec.decode(data, OpCacheStartMessage)

    assert message.job_id == CACHE_JOB_ID
    assert message.cache_key == "localai@llama-cpp"
    assert message.is_backend is True
    assert message.origin is None


def test_opcache_end_minimal_vector_decodes() -> None:
    data, _ = load_vector("opcache_end_minimal.json")

    message = codec.decode(data, OpCacheEndMessage)

    assert message.job_id == CACHE_JOB_ID
    assert message.cache_key == ""
    assert message.is_backend is False


def test_opcache_end_full_vector_decodes() -> None:
    data, _ = load_vector("opcache_end_full.json")

    message = codec.decode(data, OpCacheEndMessage)

    assert message.job_id == CACHE_JOB_ID
    assert message.cache_key == "localai@llama-cpp"
    assert message.is_backend is True


def test_invalidate_all_vector_decodes() -> None:
    data, _ = load_vector("invalidate_all.json")

    message = codec.decode(data, InvalidationMessage)

    assert message.element is None
    assert message.op is None
    assert message.origin is None


def test_invalidate_element_vector_decodes() -> None:
    data, _ = load_vector("invalidate_element.json")

    message = codec.decode(data, InvalidationMessage)

    assert message.element == "localai@llama-3.2-1b-instruct"
    assert message.op is OpType.DELETE


@pytest.mark.parametrize(
    ("name", "message_type", "added"),
    [
        ("progress_plain.json", ProgressMessage, {"schema": 1}),
        ("progress_failed_plain.json", ProgressMessage, {"schema": 1}),
        ("progress_nodes.json", ProgressMessage, {"schema": 1}),
        ("progress_replistate.json", ProgressMessage, {}),
        ("cancel_plain.json", CancelMessage, {"schema": 1}),
        ("opcache_start.json", OpCacheStartMessage, {"schema": 1}),
        # The end payload may carry an empty cache key and a false backend flag,
        # which a Go peer reads as the zero values it would assume anyway.
        (
            "opcache_end_minimal.json",
            OpCacheEndMessage,
            {"cache_key": "", "is_backend": False, "schema": 1},
        ),
        ("opcache_end_full.json", OpCacheEndMessage, {"schema": 1}),
        ("invalidate_all.json", InvalidationMessage, {"schema": 1}),
        ("invalidate_element.json", InvalidationMessage, {"schema": 1}),
    ],
)
def test_vector_reencodes_unchanged(
    name: str, message_type: type[Any], added: dict[str, Any]
) -> None:
    """Re-encoding a vector gives it back, plus only the keys replistate adds."""
    data, vector = load_vector(name)

    result = reencode(codec.decode(data, message_type))

    assert set(added).isdisjoint(vector)
    assert result == vector | added


def test_status_without_error_omits_key() -> None:
    encoded = reencode(OpStatus(progress=12.0, message="downloading"))

    assert "error" not in encoded
    assert "nodes" not in encoded


def test_status_without_error_decodes_none() -> None:
    message = ProgressMessage(job_id=JOB_ID, status=OpStatus(progress=12.0))

    decoded = codec.decode(codec.encode(message), ProgressMessage)

    assert decoded.status.error is None
    assert decoded.status.exception is None
    assert decoded.status.nodes == ()


def test_node_empty_optional_keys_omitted() -> None:
    node = NodeProgress(node_id="worker-2", node_name="gpu-box-2")

    encoded = reencode(node)

    assert encoded == {
        "node_id": "worker-2",
        "node_name": "gpu-box-2",
        "status": "queued",
        "percentage": 0.0,
    }


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ValueError("bad checksum"), id="value-error"),
        pytest.param(DownloadError("HTTP 503 from mirror"), id="custom"),
        pytest.param(OSError(28, "No space left on device"), id="os-error-errno"),
        pytest.param(KeyError("model-a"), id="key-error"),
        pytest.param(RuntimeError('line one\nline "two" ünïcode'), id="multiline"),
        pytest.param(TimeoutError(), id="empty-message"),
    ],
)
def test_error_round_trip_keeps_text(exc: BaseException) -> None:
    expected = str(exc) or type(exc).__name__
    message = ProgressMessage(job_id=JOB_ID, status=OpStatus(processed=True, error=exc))

    decoded = codec.decode(codec.encode(message), ProgressMessage)

    assert decoded.status.error == expected
    assert isinstance(decoded.status.exception, OperationFailed)
    assert str(decoded.status.exception) == expected
    assert decoded.status.state is OpState.FAILED


@pytest.mark.parametrize(
    ("payload", "expected_fragment"),
    [
        pytest.param(
            b'{"job_id": "j", "status": {"processed": "yes"}}',
            "$.status.processed",
            id="string-for-bool",
        ),
        pytest.param(
            b'{"job_id": "j", "status": {"progress": true}}',
            "$.status.progress",
            id="bool-for-number",
        ),
        pytest.param(
            b'{"job_id": "j", "status": {}, "version": true}',
            "$.version",
            id="bool-for-int",
        ),
        pytest.param(
            b'{"job_id": "j", "status": {"message": 5}}',
            "$.status.message",
            id="number-for-string",
        ),
        pytest.param(
            b'{"job_id": 7, "status": {}}',
            "$.job_id",
            id="number-for-job-id",
        ),
        pytest.param(
            b'{"job_id": "j", "status": {"nodes": [{"node_id": "n", "status": "x"}]}}',
            "$.status.nodes[0].status",
            id="unknown-node-status",
        ),
        pytest.param(
            b'{"job_id": "j", "status": {"nodes": [{"node_name": "n"}]}}',
            "$.status.nodes[0].node_id",
            id="missing-node-id",
        ),
        pytest.param(b'{"status": {}}', "$.job_id", id="missing-job-id"),
        pytest.param(b'{"job_id": "j"}', "$.status", id="missing-status"),
        pytest.param(b"[1, 2]", "JSON list", id="top-level-list"),
        pytest.param(b'"text"', "JSON str", id="top-level-string"),
        pytest.param(b"not json", "not JSON", id="not-json"),
        pytest.param(b"\xff\xfe{}", "not JSON", id="not-utf8"),
    ],
)
def test_decode_rejects_bad_payload(payload: bytes, expected_fragment: str) -> None:
    with pytest.raises(DecodeError) as caught:
        codec.decode(payload, ProgressMessage)

    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, CodecError)
    assert expected_fragment in str(caught.value)


def test_missing_field_message_names_path() -> None:
    with pytest.raises(DecodeError, match=r"required field missing @ \$\.job_id"):
        codec.decode(b'{"status": {}}', ProgressMessage)


def test_decode_error_carries_subject() -> None:
    subject = f"gallery.{JOB_ID}.progress"

    with pytest.raises(DecodeError) as caught:
        codec.decode(b"[]", ProgressMessage, subject=subject)

    assert caught.value.subject == subject


def test_unknown_keys_ignored() -> None:
    """A field added by a newer Go peer, at any level, does not break decoding."""
    payload = {
        "job_id": JOB_ID,
        "trace_id": "abc123",
        "status": {
            "progress": 12.5,
            "eta_seconds": 30,
            "nodes": [{"node_id": "w1", "status": "downloading", "gpu": "A100"}],
        },
    }

    message = codec.decode(json.dumps(payload).encode(), ProgressMessage)

    assert message.job_id == JOB_ID
    assert message.status.progress == 12.5
    assert message.status.nodes[0].node_id == "w1"
    assert message.status.nodes[0].status is NodeState.DOWNLOADING


def test_go_empty_error_object_fails() -> None:
    """Go writes an error interface value as {}: the text is lost but it failed."""
    payload = b'{"job_id": "j", "status": {"processed": true, "error": {}}}'

    message = codec.decode(payload, ProgressMessage)

    assert message.status.error is not None
    assert message.status.error != ""
    assert message.status.state is OpState.FAILED
    assert message.status.exception is not None


def cancel_payload_of_size(size: int) -> bytes:
    """Return a valid cancel payload exactly `size` bytes long."""
    frame = b'{"id": ""}'
    payload = b'{"id": "' + b"x" * (size - len(frame)) + b'"}'
    assert len(payload) == size
    return payload


def test_payload_over_limit_rejected() -> None:
    payload = cancel_payload_of_size(65)

    with pytest.raises(PayloadTooLargeError) as caught:
        codec.decode(payload, CancelMessage, max_size=64, subject="gallery.x.cancel")

    assert caught.value.size == 65
    assert caught.value.limit == 64
    assert caught.value.subject == "gallery.x.cancel"
    assert isinstance(caught.value, ValueError)


def test_payload_at_limit_accepted() -> None:
    payload = cancel_payload_of_size(64)

    message = codec.decode(payload, CancelMessage, max_size=64)

    assert message.id == "x" * 54


def test_default_limit_rejects_larger() -> None:
    payload = cancel_payload_of_size(DEFAULT_MAX_PAYLOAD + 1)

    with pytest.raises(PayloadTooLargeError) as caught:
        codec.decode(payload, CancelMessage)

    assert caught.value.limit == DEFAULT_MAX_PAYLOAD
    assert caught.value.size == DEFAULT_MAX_PAYLOAD + 1


def test_no_limit_when_max_size_none() -> None:
    payload = cancel_payload_of_size(DEFAULT_MAX_PAYLOAD + 1)

    message = codec.decode(payload, CancelMessage, max_size=None)

    assert len(message.id) == DEFAULT_MAX_PAYLOAD + 1 - len(b'{"id": ""}')


def test_record_timestamps_encode_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    minus_five = timezone(timedelta(hours=-5))
    record = OperationRecord(
        id=JOB_ID,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus_two),
        updated_at=datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=minus_five),
    )

    encoded = reencode(record)

    assert encoded["created_at"] == "2026-01-02T01:04:05+00:00"
    assert encoded["updated_at"] == "2026-01-02T08:04:05.250000+00:00"
    assert encoded["lease_expires_at"] is None
    assert encoded["status"] == "pending"
    assert encoded["op_type"] == "install"


def test_structure_naive_timestamp_raises() -> None:
    with pytest.raises(ValueError, match="no UTC offset"):
        codec.converter.structure("2026-01-02T03:04:05", datetime)


def test_decode_record_naive_timestamp_rejected() -> None:
    payload = b'{"id": "j", "created_at": "2026-01-02T03:04:05"}'

    with pytest.raises(DecodeError) as raised:
        codec.decode(payload, OperationRecord)

    assert "naive timestamp '2026-01-02T03:04:05' rejected" in str(raised.value)
    assert "$.created_at" in str(raised.value)


def test_encode_naive_datetime_raises() -> None:
    with pytest.raises(EncodeError, match="naive"):
        codec.encode(datetime(2026, 1, 2, 3, 4, 5))


def test_evolve_cannot_make_naive_record() -> None:
    """attrs.evolve runs the converters, so no naive record reaches the encoder."""
    record = OperationRecord(id=JOB_ID)

    with pytest.raises(ValueError, match="naive"):
        attrs.evolve(record, created_at=datetime(2026, 1, 2, 3, 4, 5))


def test_decode_timestamp_keeps_instant() -> None:
    payload = b'{"id": "j", "created_at": "2026-01-02T03:04:05+02:00"}'

    record = codec.decode(payload, OperationRecord)

    assert record.created_at == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert record.created_at is not None
    assert record.created_at.utcoffset() == timedelta(hours=2)


def test_structure_timestamp_keeps_instant() -> None:
    parsed = codec.converter.structure("2026-01-02T03:04:05+02:00", datetime)

    assert parsed == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)


# Property: every status survives the wire unchanged.

texts = st.text(st.characters(codec="utf-8"), max_size=20)
percentages = st.floats(
    min_value=0, max_value=100, allow_nan=False, allow_infinity=False
)

node_progress = st.builds(
    NodeProgress,
    node_id=texts,
    node_name=texts,
    status=st.sampled_from(NodeState),
    percentage=percentages,
    file_name=texts,
    current=texts,
    total=texts,
    phase=texts,
    error=texts,
)

op_statuses = st.builds(
    OpStatus,
    deletion=st.booleans(),
    file_name=texts,
    error=st.none() | texts,
    processed=st.booleans(),
    message=texts,
    progress=percentages,
    file_size=texts,
    downloaded_size=texts,
    gallery_element_name=texts,
    cancelled=st.booleans(),
    cancellable=st.booleans(),
    nodes=st.lists(node_progress, max_size=4),
)


@settings(database=None, max_examples=200)
@given(
    status=op_statuses, version=st.none() | st.integers(min_value=0, max_value=2**53)
)
def test_status_survives_round_trip(status: OpStatus, version: int | None) -> None:
    message = ProgressMessage(
        job_id=JOB_ID, status=status, origin="r1", version=version
    )

    decoded = codec.decode(codec.encode(message), ProgressMessage)

    assert decoded == message


def test_null_nodes_decode_as_empty() -> None:
    """A Go peer that writes a nil node list without omitempty sends null."""
    data = b'{"job_id": "j", "status": {"progress": 5, "nodes": null}}'

    message = codec.decode(data, ProgressMessage)

    assert message.status.nodes == ()
    assert message.status.progress == 5


def test_decode_error_cuts_huge_value() -> None:
    """A huge wrongly typed value gives a short message, fit for a log line."""
    payload = b'{"id": "j", "version": "' + b"9" * 100_000 + b'"}'

    with pytest.raises(DecodeError) as raised:
        codec.decode(payload, CancelMessage)

    message = str(raised.value)
    assert len(message) < 400
    assert "invalid value: expected int, got str '999" in message
    assert message.endswith("... [100024 characters] @ $.version")
