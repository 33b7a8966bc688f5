"""Scratchpad notes: one line an answer starts with, copying the request's decisive phrases, then the JSON.

A model that must write ``"duration": 900`` straight after the device and server values has to
find "for 15 min" among the request's many numbers at that token. A note lets it first copy the
phrase, then convert it, then write the JSON::

    duration: "for 15 min" = 900; use: "HD dashcam upload" = QOS_M
    {"device": ..., "duration": 900}

The phrases are found in the request text the generator rendered, among the wordings it chose
(:func:`make_note`), so the note never holds words the request does not. Evaluation scores the
JSON after the note (the extractor takes the first JSON object; a note holds no braces),
``translate`` prints the JSON alone, and :func:`~qod_lightning.extraction.split_note` reads a note
back.
"""

from __future__ import annotations

import re

from qod_lightning.data.generator.phrasing import duration_wordings, profile_names
from qod_lightning.data.generator.spec import RequestSpec
from qod_lightning.extraction import extract_json
from qod_lightning.schema import DEFAULT_DURATION


def _find(text: str, phrases: list[str]) -> str | None:
    """The first of ``phrases`` that occurs in ``text`` (any case, whole words), as ``text`` writes it."""
    for phrase in sorted(dict.fromkeys(p for p in phrases if p), key=len, reverse=True):
        match = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE)
        if match:
            return match.group(0)
    return None


def duration_phrase(spec: RequestSpec, text: str) -> str | None:
    """The words of ``text`` that state the session's length, or ``None`` when it states none."""
    if spec.duration is None:
        return None
    wordings = duration_wordings(spec.duration)
    seconds = [f"for {noun}" for noun in wordings.seconds] + list(wordings.seconds)
    return _find(text, [*wordings.adverbials, *wordings.nouns, *seconds])


def use_phrase(spec: RequestSpec, text: str) -> str | None:
    """The words of ``text`` that decide the profile: a profile it names, else its use case."""
    if spec.explicit_profile is not None:
        code = spec.explicit_profile
        names = "|".join(re.escape(name) for name in dict.fromkeys(profile_names(code)))
        # "profile: L", "profile=M", "profile -> E", "the large profile", "QOS_M"
        pattern = rf"(?<!\w)(?:profile\W{{1,4}}(?:{names})|(?:{names}) profile|{re.escape(code)})(?!\w)"
        match = re.search(pattern, text, flags=re.IGNORECASE)
        return match.group(0) if match else None
    if spec.use_case is None:
        return None
    return _find(text, [spec.use_case.prose, spec.use_case.bare])


def make_note(spec: RequestSpec, text: str) -> str | None:
    """The note line for a generated request, or ``None`` when a phrase cannot be found in ``text``.

    Args:
        spec: The request the text was rendered from.
        text: The rendered request.

    Returns:
        ``duration: "PHRASE" = SECONDS; use: "PHRASE" = PROFILE`` (``duration: none = 86400``
        when the request states no length), without a newline.

    """
    use = use_phrase(spec, text)
    duration = duration_phrase(spec, text)
    if use is None or (spec.duration is not None and duration is None):
        return None
    said = "none" if duration is None else f'"{duration}"'
    return f'duration: {said} = {spec.duration or DEFAULT_DURATION}; use: "{use}" = {spec.profile}'


def note_for_answer(note: str, answer: str) -> str:
    """``note`` with the duration and profile that ``answer``'s JSON holds, where it holds them.

    A rejected preference answer gets the chosen answer's phrases with its own decisions, so the
    two answers part at the decision itself.

    Args:
        note: The right note (:func:`make_note`).
        answer: An answer's text; when it holds no parsable JSON object, ``note`` is returned.

    Returns:
        The note.

    """
    body = extract_json(answer)
    if body is None:
        return note
    if isinstance(body.get("duration"), int) and not isinstance(body["duration"], bool):
        note = re.sub(r"= \d+;", f"= {body['duration']};", note, count=1)
    if isinstance(body.get("qosProfile"), str) and re.fullmatch(r"QOS_[A-Z]+", body["qosProfile"]):
        note = re.sub(r"= QOS_[A-Z]+$", f"= {body['qosProfile']}", note)
    return note
