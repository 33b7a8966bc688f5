"""Read JSONL datasets strictly: every problem is reported with the file and line that caused it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset problem, with the file and (1-based) line it was found at."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class _Refused(ValueError):
    """Raised by the decoder hooks for text that :mod:`json` accepts but JSON does not allow."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {key!r}")
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def read_objects(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    r"""Parse every non-blank line of a JSONL file into a JSON object, strictly.

    Lines end at ``\n``, ``\r\n`` or ``\r`` only (JSON text may hold U+2028 and the like
    unescaped); a UTF-8 byte-order mark is tolerated at the start of the file.

    Args:
        path: The file.

    Returns:
        ``(line number, object)`` pairs, in file order.

    Raises:
        DataError: On an unreadable, empty or non-UTF-8 file, malformed JSON (``NaN`` and
            ``Infinity`` included), a duplicate key, nesting too deep to parse, an escaped lone
            surrogate (no text can hold it), or a line that is not a JSON object.

    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(path, None, f"cannot read file ({err.strerror})") from err
    objects: list[tuple[int, dict[str, Any]]] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, number, f"not valid UTF-8 ({err.reason} at byte {err.start})") from err
        if line.strip():
            objects.append((number, _parse_object(path, number, line)))
    if not objects:
        raise DataError(path, None, "file has no records")
    return objects


def _parse_object(path: Path, number: int, line: str) -> dict[str, Any]:
    if line.startswith("\ufeff"):
        raise DataError(path, number, "malformed JSON (a UTF-8 byte-order mark past line 1: files concatenated?)")
    try:
        record = _DECODER.decode(line)
    except json.JSONDecodeError as err:
        raise DataError(path, number, f"malformed JSON ({err.msg} at column {err.colno})") from err
    except ValueError as err:  # a refused construct, or an integer too long to convert
        raise DataError(path, number, f"malformed JSON ({err})") from err
    except RecursionError as err:
        raise DataError(path, number, "malformed JSON (nested too deeply to parse)") from err
    if not isinstance(record, dict):
        raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
    if "\\u" in line:  # only an escape can produce a lone surrogate; UTF-8 input cannot
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            bad = err.object[err.start]
            raise DataError(path, number, f"escaped lone surrogate \\u{ord(bad):04x} is not text") from err
    return record


def read_jsonl(path: str | Path, schema: Mapping[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Load a JSONL file whose records must have exactly typed keys.

    Parsing is :func:`read_objects`'s. Each record gets a ``_line`` key with its 1-based line
    number so later stages can name it in their messages.

    Args:
        path: The file.
        schema: Required key -> accepted type(s). Extra keys are an error, as are empty or
            whitespace-only strings.

    Returns:
        The records, in file order.

    Raises:
        DataError: On whatever :func:`read_objects` rejects, a missing or extra key, a wrongly
            typed or empty value.

    """
    path = Path(path)
    return [_check_record(path, number, record, schema) for number, record in read_objects(path)]


def _check_record(
    path: Path, number: int, record: dict[str, Any], schema: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
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


def duplicate_lines(records: Iterable[dict[str, Any]], keys: Iterable[str]) -> list[tuple[int, int]]:
    """Find records that repeat an earlier one on ``keys``.

    Args:
        records: Records from :func:`read_jsonl` (each with its ``_line``).
        keys: The keys that make two records the same.

    Returns:
        ``(line, line of the first occurrence)`` for every repeat, in file order.

    """
    keys = tuple(keys)
    first: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []
    for record in records:
        identity = json.dumps([record[k] for k in keys], sort_keys=True, ensure_ascii=False)
        if identity in first:
            repeats.append((record["_line"], first[identity]))
        else:
            first[identity] = record["_line"]
    return repeats


def describe_duplicates(repeats: list[tuple[int, int]], limit: int = 10) -> str:
    """``"line 5 repeats line 2, line 9 repeats line 2"`` (the first ``limit``, then a count)."""
    shown = ", ".join(f"line {line} repeats line {original}" for line, original in repeats[:limit])
    return shown + (f" and {len(repeats) - limit} more" if len(repeats) > limit else "")
