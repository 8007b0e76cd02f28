"""Unit tests of the operation models: statuses, node progress, states, records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from replistate.errors import OperationFailed
from replistate.models import (
    MAX_TEXT_LENGTH,
    NodeProgress,
    NodeState,
    OperationRecord,
    OpState,
    OpStatus,
    error_text,
)


class DownloadError(Exception):
    """An application exception, as the work of an operation would raise."""


def make_node(node_id: str, **fields: Any) -> NodeProgress:
    return NodeProgress(node_id=node_id, node_name=f"host-{node_id}", **fields)


def test_node_state_values() -> None:
    assert {state.value for state in NodeState} == {
        "queued",
        "downloading",
        "running_on_worker",
        "success",
        "error",
    }


def test_with_node_replaces_known_node() -> None:
    first = make_node("n1")
    second = make_node("n2")
    third = make_node("n3")
    status = OpStatus(nodes=[first, second, third])
    updated_second = make_node("n2", status=NodeState.DOWNLOADING, percentage=60.0)

    result = status.with_node(updated_second)

    assert result.nodes == (first, updated_second, third)


def test_with_node_appends_new_node() -> None:
    first = make_node("n1")
    status = OpStatus(nodes=[first])
    new = make_node("n2", status=NodeState.QUEUED)

    result = status.with_node(new)

    assert result.nodes == (first, new)


def test_with_node_mirrors_aggregate_fields() -> None:
    node = make_node(
        "n1",
        status=NodeState.DOWNLOADING,
        percentage=55.5,
        file_name="model.gguf",
        current="1.1 GB",
        total="2.0 GB",
    )

    result = OpStatus().with_node(node)

    assert result.progress == 55.5
    assert result.file_name == "model.gguf"
    assert result.downloaded_size == "1.1 GB"
    assert result.file_size == "2.0 GB"


def test_with_node_empty_fields_keep_aggregate() -> None:
    """A node without file name or sizes leaves the aggregate ones as they were."""
    status = OpStatus(file_name="model.gguf", downloaded_size="1 GB", file_size="2 GB")

    result = status.with_node(make_node("n1", percentage=10.0))

    assert result.progress == 10.0
    assert result.file_name == "model.gguf"
    assert result.downloaded_size == "1 GB"
    assert result.file_size == "2 GB"


def test_merged_with_keeps_held_nodes() -> None:
    held_nodes = (make_node("n1"), make_node("n2"))
    current = OpStatus(progress=10.0, message="old", nodes=held_nodes)
    update = OpStatus(progress=20.0, message="new")

    result = current.merged_with(update)

    assert result.nodes == held_nodes
    assert result.progress == 20.0
    assert result.message == "new"


def test_merged_with_replaces_nodes() -> None:
    current = OpStatus(nodes=[make_node("n1"), make_node("n2")])
    replacement = (make_node("n3"),)
    update = OpStatus(progress=30.0, nodes=replacement)

    result = current.merged_with(update)

    assert result.nodes == replacement
    assert result.progress == 30.0


def test_merged_with_takes_update_fields() -> None:
    current = OpStatus(
        file_name="old.gguf",
        message="old",
        progress=10.0,
        gallery_element_name="gallery@old",
        cancellable=True,
        nodes=[make_node("n1")],
    )
    update = OpStatus(
        file_name="new.gguf",
        message="done",
        progress=100.0,
        processed=True,
        gallery_element_name="gallery@new",
        cancellable=False,
        error="boom",
    )

    result = current.merged_with(update)

    assert result.file_name == "new.gguf"
    assert result.message == "done"
    assert result.progress == 100.0
    assert result.processed is True
    assert result.gallery_element_name == "gallery@new"
    assert result.cancellable is False
    assert result.error == "boom"


ERROR_CASES = [
    pytest.param(ValueError("bad checksum"), "bad checksum", id="value-error"),
    pytest.param(
        DownloadError("HTTP 503 from mirror"), "HTTP 503 from mirror", id="custom"
    ),
    pytest.param(
        OSError(28, "No space left on device"),
        "[Errno 28] No space left on device",
        id="os-error-errno",
    ),
    pytest.param(KeyError("model-a"), "'model-a'", id="key-error-quoted"),
    pytest.param(ValueError(), "ValueError", id="empty-message"),
    pytest.param(DownloadError(""), "DownloadError", id="custom-empty-message"),
]


@pytest.mark.parametrize(("exc", "expected"), ERROR_CASES)
def test_error_text_of_exception(exc: BaseException, expected: str) -> None:
    assert error_text(exc) == expected


@pytest.mark.parametrize(("exc", "expected"), ERROR_CASES)
def test_status_error_keeps_text(exc: BaseException, expected: str) -> None:
    status = OpStatus(processed=True, error=exc)

    assert status.error == expected


@pytest.mark.parametrize(("exc", "expected"), ERROR_CASES)
def test_status_exception_same_text(exc: BaseException, expected: str) -> None:
    failure = OpStatus(processed=True, error=exc).exception

    assert isinstance(failure, OperationFailed)
    assert str(failure) == expected


def test_empty_string_means_no_error() -> None:
    assert error_text("") is None
    assert error_text(None) is None
    assert OpStatus(error="").error is None
    assert OpStatus(error="").exception is None


def test_error_string_kept() -> None:
    assert OpStatus(error="disk full").error == "disk full"


def test_error_of_other_type_rejected() -> None:
    for error in (42, {"code": 1}, b"disk full"):
        with pytest.raises(TypeError, match="pass an exception or a string"):
            OpStatus(error=error)  # type: ignore[arg-type]


def test_error_at_length_limit_kept_whole() -> None:
    text = "x" * MAX_TEXT_LENGTH

    assert error_text(RuntimeError(text)) == text


def test_long_error_cut_with_note() -> None:
    """Text over the limit is cut alike everywhere, with a note of its length."""
    cut = error_text(RuntimeError("x" * (MAX_TEXT_LENGTH + 10)))

    assert cut is not None
    assert len(cut) == MAX_TEXT_LENGTH
    assert cut.endswith(f" [cut from {MAX_TEXT_LENGTH + 10} characters]")


def test_error_nul_becomes_replacement_character() -> None:
    """PostgreSQL text cannot hold NUL, so every replica stores the same text."""
    assert error_text(ValueError("a\x00b")) == "a\ufffdb"


@pytest.mark.parametrize(
    ("status", "expected_state", "expected_terminal"),
    [
        pytest.param(OpStatus(), OpState.PENDING, False, id="fresh"),
        pytest.param(
            OpStatus(progress=40.0), OpState.DOWNLOADING, False, id="progress-40"
        ),
        pytest.param(
            OpStatus(progress=100.0, processed=False),
            OpState.PROCESSING,
            False,
            id="progress-100-not-processed",
        ),
        pytest.param(
            OpStatus(
                progress=20.0,
                nodes=[make_node("n1", status=NodeState.RUNNING_ON_WORKER)],
            ),
            OpState.PROCESSING,
            False,
            id="node-running-on-worker",
        ),
        pytest.param(
            OpStatus(processed=True, progress=100.0),
            OpState.COMPLETED,
            True,
            id="processed",
        ),
        pytest.param(
            OpStatus(processed=True, error="download failed"),
            OpState.FAILED,
            True,
            id="processed-with-error",
        ),
        pytest.param(
            OpStatus(cancelled=True, progress=40.0),
            OpState.CANCELLED,
            True,
            id="cancelled",
        ),
    ],
)
def test_status_state_mapping(
    status: OpStatus, expected_state: OpState, expected_terminal: bool
) -> None:
    assert status.state is expected_state
    assert status.terminal is expected_terminal


def test_record_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive"):
        OperationRecord(id="job-1", created_at=datetime(2026, 1, 2, 3, 4, 5))


def test_record_rejects_naive_lease() -> None:
    with pytest.raises(ValueError, match="naive"):
        OperationRecord(id="job-1", lease_expires_at=datetime(2026, 1, 2, 3, 4, 5))


def test_record_accepts_aware_datetime() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    updated = datetime(2026, 1, 2, 3, 5, 0, tzinfo=UTC)

    record = OperationRecord(id="job-1", created_at=created, updated_at=updated)

    assert record.created_at == created
    assert record.updated_at == updated


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(
            OpStatus(
                progress=40.0,
                message="downloading model.gguf",
                gallery_element_name="localai@model-a",
            ),
            id="downloading",
        ),
        pytest.param(
            OpStatus(
                processed=True,
                progress=100.0,
                message="failed",
                gallery_element_name="localai@model-b",
                error=OSError(28, "No space left on device"),
            ),
            id="failed",
        ),
    ],
)
def test_record_status_round_trip(status: OpStatus) -> None:
    record = OperationRecord.from_status("job-1", status, version=3)

    restored = record.to_status()

    assert record.id == "job-1"
    assert record.version == 3
    assert restored.progress == status.progress
    assert restored.message == status.message
    assert restored.gallery_element_name == status.gallery_element_name
    assert restored.error == status.error
    assert restored.state is status.state
