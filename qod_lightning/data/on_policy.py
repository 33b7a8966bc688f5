"""Preference pairs whose rejected answers are the SFT model's own mistakes (on-policy DPO data).

Generated rejected answers show failure modes chosen by hand (an invented field, a wrong profile,
a dropped duration...); the SFT model makes its own, which DPO can only push down if the pairs hold
them. For each pair, the SFT model's greedy answer to its prompt replaces the rejected answer
when it is wrong; when it is right (the same request as the chosen answer), or empty, the pair
keeps its generated rejected answer, so every prompt still teaches something.

:func:`field_edit_pairs` makes the same mistakes into narrower pairs: one per wrong top-level
field, whose rejected answer is the chosen one with only that field as the model wrote it. DPO's
loss compares the two answers' log-ratios, so the tokens before the edit cancel and the gradient
falls on the mistake, not on the parts of the model's answer that were right.

:func:`build_on_policy_pairs` has the SFT adapter answer a preference file's prompts and writes
either kind of pairs; it loads the generation code only when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.data.generator.notes import note_for_answer
from qod_lightning.data.jsonl import read_jsonl
from qod_lightning.data.prompts import dump_request
from qod_lightning.extraction import extract_json, split_note
from qod_lightning.metrics import json_equal, judge_prediction


def on_policy_pairs(
    records: list[dict[str, Any]], answers: list[str], wrong_only: bool = False
) -> tuple[list[dict[str, str]], int]:
    """Replace each pair's rejected answer by the model's answer to its prompt where that is wrong.

    Args:
        records: ``{"prompt", "chosen", "rejected"}`` pairs (other keys are dropped). A pair
            whose ``chosen`` holds no JSON object keeps its rejected answer.
        answers: The model's answer to each record's prompt, in order.
        wrong_only: Leave out the pairs that keep their rejected answer (the model was right,
            or gave nothing to judge), so every pair rejects one of the model's own answers.

    Returns:
        ``(pairs, replaced)``: the new ``{"prompt", "chosen", "rejected"}`` pairs, in order, and
        how many took the model's answer.

    Raises:
        ValueError: When there is not one answer per record.

    """
    _check_one_answer_each(records, answers)
    pairs, replaced = [], 0
    for record, answer in zip(records, answers, strict=True):
        expected = extract_json(record["chosen"])  # None: a broken chosen answer, nothing to judge by
        wrong = (
            expected is not None
            and bool(answer.strip())
            and not judge_prediction(answer, record["prompt"], expected).exact
        )
        replaced += wrong
        if wrong or not wrong_only:
            rejected = answer.strip() if wrong else record["rejected"]
            pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": rejected})
    return pairs, replaced


def field_edits(expected: dict[str, Any], answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The expected request with one of the answer's top-level mistakes put in, for each mistake.

    A mistake is a key whose value differs from the expected one (the answer's value goes in), a
    key the answer leaves out (it is left out), or a key the answer adds (it goes in after the
    expected keys that precede it in the answer). Keys keep the expected order.

    Args:
        expected: The right request.
        answer: The model's parsed answer.

    Returns:
        One edited copy of ``expected`` per mistake, in the order of ``expected``'s keys and then
        the added keys in the answer's order; empty when the answer is right.

    """
    edits = []
    for key, value in expected.items():
        if key not in answer:
            edits.append({k: v for k, v in expected.items() if k != key})
        elif not json_equal(answer[key], value):
            edits.append({**expected, key: answer[key]})
    items, answer_keys = list(expected.items()), list(answer)
    for position, key in enumerate(answer_keys):
        if key in expected:
            continue
        before = set(answer_keys[:position])
        cut = max((i + 1 for i, (k, _) in enumerate(items) if k in before), default=0)
        edits.append(dict([*items[:cut], (key, answer[key]), *items[cut:]]))
    return edits


def _written(request: dict[str, Any], note: str | None) -> str:
    """``request`` written the canonical way, after ``note`` made to match it when there is one."""
    body = dump_request(request)
    return body if note is None else f"{note_for_answer(note, body)}\n{body}"


def field_edit_pairs(
    records: list[dict[str, Any]], answers: list[str], wrong_only: bool = False
) -> tuple[list[dict[str, str]], int]:
    """Preference pairs that each reject one field of the model's wrong answer to their prompt.

    For a prompt whose answer parses but is wrong, one pair per mistake (:func:`field_edits`):
    the chosen answer is the expected request and the rejected one is that request with the
    mistake put in, both written the canonical way (:func:`~qod_lightning.data.prompts.dump_request`)
    so they share every token up to the edit. Where the file's chosen answer opens with a
    scratchpad note, both answers open with it, the rejected one's with its own duration and
    profile (:func:`~qod_lightning.data.generator.notes.note_for_answer`), so the pair is in the
    form the model writes. An answer with no JSON object is rejected whole; a right or empty
    answer, or a pair whose ``chosen`` holds no JSON object, keeps the file's pair.

    Args:
        records: ``{"prompt", "chosen", "rejected"}`` pairs (other keys are dropped).
        answers: The model's answer to each record's prompt, in order.
        wrong_only: Leave out the file's pairs (kept where the model was right or gave nothing
            to judge), so every pair rejects one of the model's own mistakes.

    Returns:
        ``(pairs, edited)``: the new pairs, grouped by prompt in the records' order, and how many
        of them are field edits.

    Raises:
        ValueError: When there is not one answer per record.

    """
    _check_one_answer_each(records, answers)
    pairs, edited = [], 0
    for record, answer in zip(records, answers, strict=True):
        expected, parsed = extract_json(record["chosen"]), extract_json(answer)
        keep = {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}
        if expected is None or not answer.strip():
            if not wrong_only:
                pairs.append(keep)
        elif parsed is None:
            pairs.append({**keep, "rejected": answer.strip()})
        else:
            note, _ = split_note(record["chosen"])
            edits = field_edits(expected, parsed)
            chosen = _written(expected, note)
            pairs += [{"prompt": record["prompt"], "chosen": chosen, "rejected": _written(e, note)} for e in edits]
            edited += len(edits)
            if not edits and not wrong_only:
                pairs.append(keep)
    return pairs, edited


def build_on_policy_pairs(
    adapter: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    rejected: str,
    max_new_tokens: int,
    batch_size: int,
    workers: int,
    wrong_only: bool = False,
) -> str:
    """Write DPO pairs whose rejected answers are the SFT adapter's own mistakes.

    The adapter answers every prompt of ``source`` greedily; a wrong answer becomes the pair's
    rejected one (:func:`on_policy_pairs`), or each of its wrong fields one pair's
    (:func:`field_edit_pairs`), as ``rejected`` says.

    Args:
        adapter: The SFT adapter (or model) directory; its saved prompt format is used.
        source: Preference JSONL of ``{"prompt", "chosen", "rejected"}`` pairs.
        output: Where the pairs go, written atomically.
        rejected: ``answer`` (the whole wrong answer) or ``fields`` (one wrong field per pair).
        max_new_tokens: The most tokens generated per answer.
        batch_size: Prompts per generation batch.
        workers: Batches decoded at once in threads, on a CPU.
        wrong_only: Keep only the pairs that reject the adapter's own mistakes.

    Returns:
        What the pairs hold, for a log line: how many took the adapter's answers, of how many.

    Raises:
        ValueError: When ``wrong_only`` leaves no pair (the adapter answered every prompt right).

    """
    from qod_lightning.data.preference import PREFERENCE_RECORD
    from qod_lightning.generation import generate
    from qod_lightning.model import free_gpu_memory, load_for_inference, resolve_prompt_format

    records = read_jsonl(source, PREFERENCE_RECORD)
    model, tokenizer = load_for_inference(str(adapter))
    answers = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        prompt_format=resolve_prompt_format(adapter, None),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        workers=workers,
    )
    del model
    free_gpu_memory()
    if rejected == "fields":
        pairs, edited = field_edit_pairs(records, answers, wrong_only)
        what = (
            f"{edited} of {len(pairs)} pairs reject one wrong field of the SFT adapter's answers "
            f"to the {len(records)} prompts"
        )
    else:
        pairs, replaced = on_policy_pairs(records, answers, wrong_only)
        what = (
            f"the SFT adapter's own answer is the rejected one in {replaced} of {len(pairs)} pairs "
            f"from {len(records)} prompts"
        )
    if not pairs:
        raise ValueError(
            f"the SFT adapter {adapter} answers all {len(records)} prompts of {source} right, so no pair "
            "rejects one of its mistakes: give it more (or harder) prompts, or keep the file's pairs"
        )
    atomic_write_text(output, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    return what


def _check_one_answer_each(records: list[dict[str, Any]], answers: list[str]) -> None:
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} preference pairs")
