"""Preference pairs whose rejected answers are the SFT model's own mistakes (on-policy DPO data).

Generated rejected answers show failure modes chosen by hand (an invented field, a wrong profile,
a dropped duration...); the SFT model makes its own, which DPO can only push down if the pairs hold
them. For each pair, the SFT model's greedy answer to its prompt replaces the rejected answer
when it is wrong; when it is right (the same request as the chosen answer), or empty, the pair
keeps its generated rejected answer, so every prompt still teaches something.
"""

from __future__ import annotations

from typing import Any

from qod_lightning.extraction import extract_json
from qod_lightning.metrics import judge_prediction


def on_policy_pairs(records: list[dict[str, Any]], answers: list[str]) -> tuple[list[dict[str, str]], int]:
    """Replace each pair's rejected answer by the model's answer to its prompt where that is wrong.

    Args:
        records: ``{"prompt", "chosen", "rejected"}`` pairs (other keys are dropped). A pair
            whose ``chosen`` holds no JSON object keeps its rejected answer.
        answers: The model's answer to each record's prompt, in order.

    Returns:
        ``(pairs, replaced)``: the new ``{"prompt", "chosen", "rejected"}`` pairs, in order, and
        how many took the model's answer.

    Raises:
        ValueError: When there is not one answer per record.

    """
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} preference pairs")
    pairs, replaced = [], 0
    for record, answer in zip(records, answers, strict=True):
        expected = extract_json(record["chosen"])  # None: a broken chosen answer, nothing to judge by
        wrong = (
            expected is not None
            and bool(answer.strip())
            and not judge_prediction(answer, record["prompt"], expected).exact
        )
        rejected = answer.strip() if wrong else record["rejected"]
        replaced += wrong
        pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": rejected})
    return pairs, replaced
