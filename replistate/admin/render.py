"""Text and JSON output of the administration commands.

Progress bars are drawn only when stdout is a terminal; the functions here take
the width to draw in, so they are the same on a terminal and in tests. Times are
shown in UTC, as ``2025-01-31T12:00:03Z``.

Text from the bus and the table, such as a status message, may contain terminal
escape sequences. The text output shows each control character as an escape
such as ``\\x1b`` (see `printable`), and the JSON output escapes it as JSON does,
so neither can move the cursor, retitle the window or clear the screen.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

from replistate.codec import converter
from replistate.models import OperationRecord, OpStatus

__all__ = [
    "MAX_BAR_WIDTH",
    "MIN_BAR_WIDTH",
    "detail_lines",
    "fit",
    "operations_table",
    "percent_text",
    "printable",
    "progress_bar",
    "record_document",
    "status_document",
    "status_line",
    "terminal_width",
    "to_json",
    "utc_text",
    "value_text",
]

MIN_BAR_WIDTH: Final = 12
"""Narrowest progress bar drawn, in characters, brackets included."""
MAX_BAR_WIDTH: Final = 32
"""Widest progress bar drawn, in characters, brackets included."""

_CONTROL_CHARACTERS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
"""C0 and C1 control characters and DEL, which terminals act on, the Unicode
bidirectional controls, which reorder the text shown around them, and lone
surrogates, which stdout cannot encode."""

_JSON_UNSAFE: Final = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
"""The characters of `_CONTROL_CHARACTERS` that orjson writes unescaped. They
only occur inside JSON strings, where a \\u escape stands for the same text."""

TABLE_HEADERS: Final = ("JOB", "NAME", "STATE", "PROGRESS", "OWNER", "UPDATED")
COLUMN_GAP: Final = "  "


def terminal_width(stream: TextIO) -> int | None:
    """Return the width in columns of the terminal `stream` writes to, or None
    when it is not a terminal, so that no bars are drawn."""
    try:
        if not stream.isatty():
            return None
    except ValueError:  # a closed stream
        return None
    return shutil.get_terminal_size().columns


def printable(text: str) -> str:
    """Return `text` with each control character shown as a Python escape,
    ``\\x1b`` for ESC or ``\\u202e`` for a bidirectional override, so that it
    prints on one line and cannot drive the terminal. Other text is unchanged."""
    return _CONTROL_CHARACTERS.sub(_escape, text)


_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    code = ord(character)
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def progress_bar(percent: float, width: int) -> str:
    """Return a bar of exactly `width` characters, brackets included.

    `percent` is clamped to 0 to 100; a cell is filled only once the bar reaches
    it, so 99.9 % never draws a full bar. A width under 3 is taken as 3.
    """
    cells = max(width, 3) - 2
    clamped = min(max(percent, 0.0), 100.0)
    filled = int(cells * clamped / 100)
    return "[" + "#" * filled + "." * (cells - filled) + "]"


def percent_text(percent: float) -> str:
    """Return `percent` as a whole percentage padded to 4 characters, such as
    ``" 42%"``. The fraction is dropped, as the operations API does."""
    return f"{int(min(max(percent, 0.0), 100.0)):3d}%"


def utc_text(value: datetime | None) -> str:
    """Return `value` in UTC to the second, or ``-`` for None."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def value_text(value: object) -> str:
    """Return a field value as the text output shows it: booleans as in JSON,
    None as ``-``, times in UTC."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, datetime):
        return utc_text(value)
    return str(value)


def fit(line: str, width: int | None) -> str:
    """Cut `line` to one character less than `width`, so a terminal never wraps
    it. A `width` of None leaves it whole."""
    if width is None or len(line) < width:
        return line
    return line[: max(width - 1, 1)]


def to_json(document: object) -> str:
    """Return `document` as one line of JSON, with every control character of
    its strings escaped, so the line decodes to the same document."""
    text = orjson.dumps(document).decode()
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def record_document(record: OperationRecord) -> dict[str, Any]:
    """Return a stored row as a JSON object keyed by column name."""
    document: dict[str, Any] = converter.unstructure(record)
    return document


def status_document(status: OpStatus) -> dict[str, Any]:
    """Return a status as its wire JSON, with its `state` and `terminal` flag."""
    document: dict[str, Any] = converter.unstructure(status)
    document["state"] = status.state.value
    document["terminal"] = status.terminal
    return document


def operations_table(
    records: Sequence[OperationRecord], width: int | None = None
) -> list[str]:
    """Return the lines of the `ops list` table, header first.

    Args:
        records: the rows to list, in order.
        width: the terminal width in columns, to draw a progress bar per row that
            fills what the other columns leave, up to `MAX_BAR_WIDTH`. No bar is
            drawn when None, or when less than `MIN_BAR_WIDTH` is left, because
            the rows would wrap.
    """
    rows = [
        [
            printable(record.id),
            printable(record.gallery_element_name or record.cache_key or "-"),
            record.status.value,
            percent_text(record.progress),
            printable(record.frontend_id or "-"),
            utc_text(record.updated_at),
        ]
        for record in records
    ]
    progress_column = TABLE_HEADERS.index("PROGRESS")
    room = 0
    if width is not None:
        widths = _column_widths(TABLE_HEADERS, rows)
        others = sum(widths) - widths[progress_column]
        gaps = len(COLUMN_GAP) * (len(TABLE_HEADERS) - 1)
        # The bar, a space and the percentage share the progress column.
        room = width - 1 - others - gaps - len(" 100%")
    if room >= MIN_BAR_WIDTH:
        bar_width = min(room, MAX_BAR_WIDTH)
        for row, record in zip(rows, records, strict=True):
            bar = progress_bar(record.progress, bar_width)
            row[progress_column] = f"{bar} {row[progress_column]}"
    widths = _column_widths(TABLE_HEADERS, rows)
    return [
        COLUMN_GAP.join(
            cell.ljust(size) for cell, size in zip(row, widths, strict=True)
        ).rstrip()
        for row in [list(TABLE_HEADERS), *rows]
    ]


def _column_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [
        max([len(header), *(len(row[index]) for row in rows)])
        for index, header in enumerate(headers)
    ]


def detail_lines(record: OperationRecord, width: int | None = None) -> list[str]:
    """Return the lines of `ops show`: every column of the row, then the status
    replicas decode from it.

    Args:
        record: the row.
        width: the terminal width, to draw a progress bar; None for no bar.
    """
    stored = record_document(record)
    decoded = status_document(record.to_status())
    label_width = max(len(key) for key in [*stored, *decoded]) + 4
    lines = []
    for key, value in stored.items():
        text = printable(value_text(getattr(record, key)))
        if key == "progress":
            text = f"{value:g}%"
            if width is not None:
                text = f"{progress_bar(record.progress, MAX_BAR_WIDTH)} {text}"
        lines.append(f"{key:<{label_width}}{text}".rstrip())

    lines.append("")
    lines.append("status as replicas decode it:")
    for key, value in decoded.items():
        lines.append(
            f"  {key:<{label_width - 2}}{printable(value_text(value))}".rstrip()
        )
    return lines


def status_line(status: OpStatus, width: int | None = None) -> str:
    """Return one line on a status, as `ops show --follow` prints each change.

    With a terminal `width`, the line starts with a progress bar and is cut to
    fit the width.
    """
    parts = [percent_text(status.progress), status.state.value]
    if status.message:
        parts.append(status.message)
    line = " ".join(parts)
    if status.error is not None:
        line += f" (error: {status.error})"
    line = printable(line)
    if width is None:
        return line
    bar_width = min(max(width // 3, MIN_BAR_WIDTH), MAX_BAR_WIDTH)
    return fit(f"{progress_bar(status.progress, bar_width)} {line}", width)
