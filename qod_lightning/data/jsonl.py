"""Read JSONL datasets strictly: every problem is reported with the file and line that caused it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset problem, with the file and (1-based) line it was found at."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def read_jsonl(path: str | Path, schema: Mapping[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Load a JSONL file whose records must have exactly typed keys.

    Blank lines are allowed; a UTF-8 byte-order mark is tolerated. Each record gets a ``_line``
    key with its 1-based line number so later stages can name it in their messages.

    Args:
        path: The file.
        schema: Required key -> accepted type(s). Extra keys are an error, as are empty or
            whitespace-only strings.

    Returns:
        The records, in file order.

    Raises:
        DataError: On an unreadable, empty or non-UTF-8 file, malformed JSON, a record that is not
            an object, a missing or extra key, a wrongly typed or empty value.

    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(path, None, f"cannot read file ({err.strerror})") from err
    records: list[dict[str, Any]] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, number, f"not valid UTF-8 ({err.reason} at byte {err.start})") from err
        if not line.strip():
            continue
        records.append(_parse_record(path, number, line, schema))
    if not records:
        raise DataError(path, None, "file has no records")
    return records


def _parse_record(path: Path, number: int, line: str, schema: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(path, number, f"malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in schema if k not in record]
    if missing:
        raise DataError(path, number, f"missing key(s) {missing}; expected {sorted(schema)}")
    extra = [k for k in record if k not in schema]
    if extra:
        raise DataError(path, number, f"unexpected key(s) {extra}; expected {sorted(schema)}")
    for key, expected in schema.items():
        value = record[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            names = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
            raise DataError(path, number, f"key {key!r} must be {names}, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise DataError(path, number, f"key {key!r} is empty")
    record["_line"] = number
    return record
