"""Unit tests of subject names, id validation and NATS subject matching."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from replistate.errors import InvalidIdError
from replistate.subjects import Subjects, subject_matches, validate_token

JOB_ID = "3f2b8c1e-7a4d-4e2b-9c1a-5d6e7f809a1b"


def test_default_prefix_subjects() -> None:
    subjects = Subjects()

    assert subjects.progress(JOB_ID) == f"gallery.{JOB_ID}.progress"
    assert subjects.cancel(JOB_ID) == f"gallery.{JOB_ID}.cancel"
    assert subjects.opcache_start == "gallery.opcache.start"
    assert subjects.opcache_end == "gallery.opcache.end"
    assert subjects.invalidate_models == "cache.invalidate.models"
    assert subjects.invalidate_backends == "cache.invalidate.backends"
    assert subjects.all_progress == "gallery.*.progress"
    assert subjects.all_cancel == "gallery.*.cancel"
    assert subjects.all_opcache == "gallery.opcache.*"


def test_custom_prefix_used_everywhere() -> None:
    subjects = Subjects(prefix="tenant1.gallery")

    assert subjects.progress(JOB_ID) == f"tenant1.gallery.{JOB_ID}.progress"
    assert subjects.cancel(JOB_ID) == f"tenant1.gallery.{JOB_ID}.cancel"
    assert subjects.opcache_start == "tenant1.gallery.opcache.start"
    assert subjects.opcache_end == "tenant1.gallery.opcache.end"
    assert subjects.all_progress == "tenant1.gallery.*.progress"
    assert subjects.all_cancel == "tenant1.gallery.*.cancel"
    assert subjects.all_opcache == "tenant1.gallery.opcache.*"


def test_custom_cache_prefix() -> None:
    subjects = Subjects(cache_prefix="tenant1.cache")

    assert subjects.invalidate_models == "tenant1.cache.models"
    assert subjects.invalidate_backends == "tenant1.cache.backends"


INVALID_IDS = [
    pytest.param("a.b", id="dot"),
    pytest.param("*", id="star"),
    pytest.param(">", id="greater-than"),
    pytest.param("a b", id="space"),
    pytest.param("tab\there", id="tab"),
    pytest.param("nl\n", id="newline"),
    pytest.param("\x00", id="nul"),
    pytest.param("\x7f", id="delete"),
    pytest.param("", id="empty"),
]

BUILDERS: list[Callable[[Subjects, str], str]] = [Subjects.progress, Subjects.cancel]


@pytest.mark.parametrize("job_id", INVALID_IDS)
@pytest.mark.parametrize("builder", BUILDERS, ids=["progress", "cancel"])
def test_invalid_id_rejected(
    builder: Callable[[Subjects, str], str], job_id: str
) -> None:
    with pytest.raises(InvalidIdError) as caught:
        builder(Subjects(), job_id)

    assert isinstance(caught.value, ValueError)
    assert repr(job_id) in str(caught.value)
    assert caught.value.value == job_id


@pytest.mark.parametrize("job_id", INVALID_IDS)
def test_validate_token_rejects(job_id: str) -> None:
    with pytest.raises(InvalidIdError) as caught:
        validate_token(job_id)

    assert caught.value.value == job_id
    assert caught.value.reason != ""


@pytest.mark.parametrize("job_id", ["job\x80", "job\x9b[2J"], ids=["pad", "csi"])
def test_c1_control_character_rejected(job_id: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_token(job_id)


@pytest.mark.parametrize(
    "prefix",
    [
        "gallery.",
        ".gallery",
        "tenant1..gallery",
        "gal*lery",
        "gallery.>",
        "gal lery",
        "",
    ],
)
def test_bad_prefix_rejected(prefix: str) -> None:
    with pytest.raises(InvalidIdError) as caught:
        Subjects(prefix=prefix)

    assert caught.value.value == prefix
    assert repr(prefix) in str(caught.value)


@pytest.mark.parametrize("cache_prefix", ["cache.", "cache.*", "cache\tinvalidate"])
def test_bad_cache_prefix_rejected(cache_prefix: str) -> None:
    with pytest.raises(InvalidIdError) as caught:
        Subjects(cache_prefix=cache_prefix)

    assert caught.value.value == cache_prefix
    assert repr(cache_prefix) in str(caught.value)


@pytest.mark.parametrize("job_id", [JOB_ID, "model-a@gallery", "modèle"])
def test_valid_id_accepted_unchanged(job_id: str) -> None:
    subjects = Subjects()

    assert validate_token(job_id) == job_id
    assert subjects.progress(job_id) == f"gallery.{job_id}.progress"
    assert subjects.cancel(job_id) == f"gallery.{job_id}.cancel"
    assert subjects.job_id_of(subjects.progress(job_id)) == job_id


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*.c", "a.b.c", True),
        ("A.b", "a.b", False),
        ("a.b", "a.B", False),
        ("gallery.*.progress", f"gallery.{JOB_ID}.progress", True),
        ("gallery.*.progress", f"gallery.{JOB_ID}.cancel", False),
        ("gallery.opcache.*", "gallery.opcache.start", True),
    ],
)
def test_subject_matches_nats_rules(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (f"gallery.{JOB_ID}.progress", JOB_ID),
        (f"gallery.{JOB_ID}.cancel", JOB_ID),
        ("gallery.opcache.start", None),
        ("gallery.opcache.end", None),
        ("cache.invalidate.models", None),
        (f"other.{JOB_ID}.progress", None),
        (f"tenant1.gallery.{JOB_ID}.progress", None),
        (f"gallery.{JOB_ID}.status", None),
        (f"gallery.{JOB_ID}.progress.extra", None),
        ("gallery", None),
    ],
)
def test_job_id_of_default_prefix(subject: str, expected: str | None) -> None:
    assert Subjects().job_id_of(subject) == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (f"tenant1.gallery.{JOB_ID}.progress", JOB_ID),
        (f"tenant1.gallery.{JOB_ID}.cancel", JOB_ID),
        ("tenant1.gallery.opcache.start", None),
        (f"gallery.{JOB_ID}.progress", None),
    ],
)
def test_job_id_of_custom_prefix(subject: str, expected: str | None) -> None:
    assert Subjects(prefix="tenant1.gallery").job_id_of(subject) == expected


@pytest.mark.parametrize("build", ["progress", "cancel"])
def test_opcache_job_id_rejected(build: str) -> None:
    """A job named "opcache" would put its progress under the OpCache pattern."""
    subjects = Subjects()

    with pytest.raises(InvalidIdError) as caught:
        getattr(subjects, build)("opcache")

    assert caught.value.value == "opcache"
    assert "reserved" in caught.value.reason
