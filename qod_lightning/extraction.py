"""Find the request JSON in free model text: the first balanced object that parses, never ``eval``."""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name))
MAX_ATTEMPTS = 256
"""Start positions tried before giving up, so hostile text (``{`` repeated 100k times) stays cheap."""


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's json accepts them by default.
    raise ValueError(f"non-standard JSON constant {name}")


def find_json_object(text: str) -> tuple[dict[str, Any], int, int] | None:
    """Locate the first JSON object in ``text`` that parses.

    Tolerates code fences, prose before and after, and broken candidate objects before the good
    one. Never raises on any input string.

    Args:
        text: Raw model output or any other text.

    Returns:
        ``(obj, start, end)`` with ``text[start:end]`` the object's source, or ``None``.

    """
    if not isinstance(text, str):
        return None
    start = text.find("{")
    attempts = 0
    while start != -1 and attempts < MAX_ATTEMPTS:
        attempts += 1
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj, start, end
        start = text.find("{", start + 1)
    return None


def extract_json(text: str) -> dict[str, Any] | None:
    """Return the first JSON object in ``text``, or ``None`` when there is none.

    Args:
        text: Raw model output.

    Returns:
        The parsed object, or ``None``.

    """
    found = find_json_object(text)
    return None if found is None else found[0]
