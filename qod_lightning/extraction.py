"""Find the request JSON in free model text: the first top-level object that parses, never ``eval``."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_ATTEMPTS = 256
"""Candidate objects tried before giving up, so hostile text (``{"x"}`` repeated 100k times) stays cheap."""
_CANDIDATE = re.compile(r'\{\s*["}]')
"""Where a JSON object can start: a brace followed by a key or by its closing brace. Other braces
(``:-{``, ``{x}``, Python's ``{'a': 1}``) are prose or code, and never hide an object after them."""


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's json accepts them by default.
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys, other parsers the first or neither: an object
    # whose meaning depends on the server's parser is not a valid answer (nor a valid record).
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise ValueError("duplicate key in object")
    return obj


NOTE_REGEX = r'duration: ("[^"\n{}]*"|none) = [0-9]+; use: "[^"\n{}]*" = QOS_[A-Z]+\n'
"""A scratchpad note (:mod:`qod_lightning.data.generator.notes`) as an answer's first line, newline included.

Written in the regex syntax that both Python and xgrammar read (constrained decoding lets it open an answer)."""
NOTE_LINE = re.compile(NOTE_REGEX)


def split_note(answer: str) -> tuple[str | None, str]:
    """Split an answer into its scratchpad note line (``None`` when it has none) and the rest."""
    match = NOTE_LINE.match(answer)
    if match is None:
        return None, answer
    return match.group(0).rstrip("\n"), answer[match.end() :]


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _span_end(text: str, start: int) -> int | None:
    """End of the brace-balanced span that opens at ``text[start]``, or ``None`` if it never closes.

    Braces inside JSON strings do not count, so ``{"a": "}"}`` is one span.
    """
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            escaped = char == "\\" and not escaped
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def find_json_object(text: str) -> tuple[dict[str, Any], int, int] | None:
    """Locate the first top-level JSON object in ``text`` that parses.

    Tolerates code fences, prose before and after, and broken candidate objects before the good
    one. NaN, Infinity and an object that repeats a key anywhere do not parse. A candidate (a
    ``{`` followed by ``"`` or ``}``) that fails to parse is skipped whole, to the brace that
    closes it, so an object nested inside it is never taken for the answer: a truncated answer
    (``{"device":{"ipv4Address":{...}},"qosProf``) holds no object, not its first inner one.
    A candidate that never closes ends the search for the same reason. Never raises on any
    input string.

    Args:
        text: Raw model output or any other text.

    Returns:
        ``(obj, start, end)`` with ``text[start:end]`` the object's source, or ``None``.

    """
    if not isinstance(text, str):
        return None
    candidate = _CANDIDATE.search(text)
    attempts = 0
    while candidate is not None and attempts < MAX_ATTEMPTS:
        attempts += 1
        start = candidate.start()
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            span_end = _span_end(text, start)
            if span_end is None:
                return None
            candidate = _CANDIDATE.search(text, span_end)
            continue
        return obj, start, end  # text[start] is "{", so what parsed is an object
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
