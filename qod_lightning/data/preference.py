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
    instruction is :data:`~qod_lightning.data.prompts.SYSTEM_PROMPT`, as in SFT. See
    :class:`~qod_lightning.data.base.TokenizedDataModule` for the arguments.
    """

    layout = PairLayout()
    """Packed rows unless the model asks for two rows (a class default; the DPO module sets its own)."""

    encoded_keys = ("prompt_ids", "chosen_ids", "rejected_ids", "input_ids")
    answer_key = "chosen"

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
        """Prompt ids (truncated to fit the longer answer) and both answers' ids + EOS."""
        prompt_ids = encode_prompt(self.tokenizer, record["prompt"], SYSTEM_PROMPT, self.hparams.prompt_format)
        chosen = encode_response(self.tokenizer, record["chosen"])
        rejected = encode_response(self.tokenizer, record["rejected"])
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
