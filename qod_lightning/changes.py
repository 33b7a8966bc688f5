"""What a second model changed in a first model's answers, record by record (what DPO fixed and broke)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qod_lightning.metrics import judge_prediction
from qod_lightning.schema import TOP_LEVEL_KEYS


def answer_changes(
    before: Sequence[str], after: Sequence[str], requests: Sequence[str], expected: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Count the answers that a second model got right where the first was wrong, and the reverse.

    Aggregate scores hide churn: two models at the same exact match may disagree on many records.
    This counts, over the same requests, each way a record moved.

    Args:
        before: The first model's raw answers.
        after: The second model's raw answers, aligned with ``before``.
        requests: The request texts.
        expected: The reference requests.

    Returns:
        ``n``; ``changed`` (answers whose text differs); ``exact``, ``valid`` and each field of
        :data:`~qod_lightning.schema.TOP_LEVEL_KEYS` under ``fields`` as ``{"fixed", "broken"}``
        (fields only where the reference has them); ``hallucinated`` as ``{"fixed", "introduced"}``.

    Raises:
        ValueError: If the four sequences differ in length.

    """
    if not len(before) == len(after) == len(requests) == len(expected):
        raise ValueError(
            f"before, after, requests and expected differ in length: "
            f"{len(before)}, {len(after)}, {len(requests)}, {len(expected)}"
        )
    changes: dict[str, Any] = {
        "n": len(before),
        "changed": sum(a != b for a, b in zip(before, after, strict=True)),
        "exact": {"fixed": 0, "broken": 0},
        "valid": {"fixed": 0, "broken": 0},
        "hallucinated": {"fixed": 0, "introduced": 0},
        "fields": {key: {"fixed": 0, "broken": 0} for key in TOP_LEVEL_KEYS},
    }
    for old_answer, new_answer, request, reference in zip(before, after, requests, expected, strict=True):
        old = judge_prediction(old_answer, request, reference)
        new = judge_prediction(new_answer, request, reference)
        _count(changes["exact"], old.exact, new.exact)
        _count(changes["valid"], old.valid, new.valid)
        # Fewer hallucinations is the better direction: a fix is one that went away.
        changes["hallucinated"]["fixed"] += old.hallucinated and not new.hallucinated
        changes["hallucinated"]["introduced"] += new.hallucinated and not old.hallucinated
        for key, present, was, now in zip(
            TOP_LEVEL_KEYS, old.fields_expected, old.fields_correct, new.fields_correct, strict=True
        ):
            if present:
                _count(changes["fields"][key], was, now)
    return changes


def _count(tally: dict[str, int], was: bool, now: bool) -> None:
    tally["fixed"] += now and not was
    tally["broken"] += was and not now


def changes_markdown(changes: Mapping[str, Any], before: str, after: str) -> str:
    """A table of :func:`answer_changes`: one row per check, how many records ``after`` fixed and broke."""
    lines = [
        f"{after} against {before}: {changes['changed']} of {changes['n']} answers changed.",
        "",
        f"| check | fixed by {after} | broken by {after} |",
        "|---|---:|---:|",
        f"| exact match | {changes['exact']['fixed']} | {changes['exact']['broken']} |",
        f"| schema-valid | {changes['valid']['fixed']} | {changes['valid']['broken']} |",
        f"| no hallucination | {changes['hallucinated']['fixed']} | {changes['hallucinated']['introduced']} |",
    ]
    lines += [f"| {key} | {tally['fixed']} | {tally['broken']} |" for key, tally in changes["fields"].items()]
    return "\n".join(lines) + "\n"
