"""Preference data: ``{"prompt", "chosen", "rejected"}`` records for DPO."""

from __future__ import annotations

from typing import Any

import torch

from qod_lightning.data.base import TokenizedDataModule
from qod_lightning.data.jsonl import DataError, read_jsonl
from qod_lightning.data.packing import pack_pairs
from qod_lightning.data.prompts import SYSTEM_PROMPT
from qod_lightning.data.sft import warn_about_records
from qod_lightning.data.tokenize import encode_prompt, encode_response, fit_to_length, pad_batch
from qod_lightning.logprobs import IGNORE_INDEX, PairLayout

PREFERENCE_RECORD = {"prompt": str, "chosen": str, "rejected": str}


class PreferenceDataModule(TokenizedDataModule):
    """DPO batches holding chosen and rejected answers to the same prompts.

    A batch of B pairs comes in one of two layouts, chosen by :attr:`layout` (the DPO module
    sets it for its model when it is set up, :func:`~qod_lightning.logprobs.pair_layout`):
    packed, one ``prompt | chosen | rejected`` row per pair (``packed_*``, (B, L)), so the prompt is
    scored once (:mod:`~qod_lightning.data.packing`); or two rows per pair, ``input_ids``,
    ``attention_mask`` and ``labels`` of shape (2B, T): rows ``[:B]`` the chosen answers and rows
    ``[B:]`` the rejected ones, padded to one length so the policy scores both in a single forward
    pass. Labels are ``-100`` on the prompt and padding. ``prompt`` is the user's request; the
    instruction is :data:`~qod_lightning.data.prompts.SYSTEM_PROMPT`, as in SFT.

    Args:
        step_tokens: When set, each pair keeps only this many tokens of each answer from the first
            token where they differ, and the tokens they share before it join the prompt (Step-DPO,
            Lai et al. 2024, arXiv:2406.18629: prefer the first right step to the first wrong one).
            The shared tokens add the same log-ratio to both answers, so moving them changes no
            DPO loss; cutting the tail stops DPO from pushing down what a wrong answer goes on to
            copy right (its addresses, its closing braces) after its mistake. ``None`` keeps
            whole answers.
        **kwargs: See :class:`~qod_lightning.data.base.TokenizedDataModule`.
    """

    layout = PairLayout()
    """Packed rows unless the model asks for two rows (a class default; the DPO module sets its own)."""

    encoded_keys = ("prompt_ids", "chosen_ids", "rejected_ids", "input_ids")
    answer_key = "chosen"

    def __init__(self, *args: Any, step_tokens: int | None = None, **kwargs: Any) -> None:
        if step_tokens is not None and step_tokens < 1:
            raise ValueError(f"step_tokens must be at least 1 (or null for whole answers), got {step_tokens}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def read(self, path: str) -> list[dict[str, Any]]:
        """Read preference records; a pair whose chosen equals its rejected is an error.

        Repeated pairs and ``chosen`` answers that are not a bare valid request for their prompt
        are kept but reported by line in a warning (``rejected`` answers are meant to be wrong).
        """
        records = read_jsonl(path, PREFERENCE_RECORD)
        for record in records:
            if record["chosen"].strip() == record["rejected"].strip():
                raise DataError(path, record["_line"], "'chosen' is identical to 'rejected': nothing to learn")
        warn_about_records(path, records, PREFERENCE_RECORD, "chosen", "prompt")
        return records

    def encode(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Prompt ids (truncated to fit the longer answer) and both answers' ids + EOS (or their steps)."""
        prompt_ids = encode_prompt(self.tokenizer, record["prompt"], SYSTEM_PROMPT, self.hparams.prompt_format)
        chosen = encode_response(self.tokenizer, record["chosen"])
        rejected = encode_response(self.tokenizer, record["rejected"])
        if self.hparams.step_tokens is not None:
            try:
                shared, chosen, rejected = first_steps(chosen, rejected, self.hparams.step_tokens)
            except ValueError as err:
                raise ValueError(f"line {record['_line']}: {err}") from err
            prompt_ids = prompt_ids + shared
        longer = chosen if len(chosen) >= len(rejected) else rejected
        kept = fit_to_length(prompt_ids, longer, self.hparams.max_length, self.tokenizer.bos_token_id)
        if kept is None:
            return None
        return {
            "prompt_ids": kept,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "truncated": len(kept) < len(prompt_ids),
            # the length used to group batches
            "input_ids": kept + longer,
        }

    def weight(self, example: dict[str, Any]) -> int:
        """One per pair: the DPO loss is a mean over pairs."""
        return 1

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch in :attr:`layout`: packed rows where they fit the model's window, else two rows.

        ``packed_*`` (B, L): one ``prompt | chosen | rejected`` row per pair
        (:func:`~qod_lightning.data.packing.pack_pairs`). ``input_ids``/``attention_mask``/``labels``
        (2B, T): chosen rows then rejected rows, right-padded to one length.
        """
        pad_id, multiple = self.tokenizer.pad_token_id, self.hparams.pad_to_multiple_of
        if self.layout.packed:
            packed = pack_pairs(items, pad_id, multiple)
            if self.layout.fits(packed):
                return packed
        rows = [
            {
                "input_ids": item["prompt_ids"] + item[key],
                "labels": [IGNORE_INDEX] * len(item["prompt_ids"]) + item[key],
            }
            for key in ("chosen_ids", "rejected_ids")
            for item in items
        ]
        return pad_batch(rows, pad_id, pad_to_multiple_of=multiple)


def first_steps(chosen: list[int], rejected: list[int], step_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """Split two answers at their first differing token.

    Args:
        chosen: The chosen answer's ids.
        rejected: The rejected answer's ids; it must differ from ``chosen``.
        step_tokens: How many ids of each answer to keep from the first difference.

    Returns:
        The ids both share before the first difference, then at most ``step_tokens`` ids of
        ``chosen`` and of ``rejected`` from there.

    Raises:
        ValueError: If the two answers have the same tokens.

    """
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):  # the answers may differ in length
        if a != b:
            break
        shared += 1
    if shared == min(len(chosen), len(rejected)):
        # One answer is a prefix of the other: both end in EOS, so this only happens when they are equal.
        raise ValueError("the chosen and rejected answers have the same tokens")
    end = shared + step_tokens
    return chosen[:shared], chosen[shared:end], rejected[shared:end]
