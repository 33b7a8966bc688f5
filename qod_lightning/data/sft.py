"""SFT data: ``{"instruction", "input", "response"}`` records; loss only on response tokens + EOS."""

from __future__ import annotations

from typing import Any

import torch

from qod_lightning.data.base import TokenizedDataModule
from qod_lightning.data.jsonl import read_jsonl
from qod_lightning.data.tokenize import (
    IGNORE_INDEX,
    encode_prompt,
    encode_response,
    fit_to_length,
    format_prompt,
    pad_batch,
)

SFT_RECORD = {"instruction": str, "input": str, "response": str}


class SFTDataModule(TokenizedDataModule):
    """Supervised fine-tuning batches: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Labels are ``-100`` on the prompt and on padding, so the loss falls on response tokens and
    the EOS that ends them. See :class:`~qod_lightning.data.base.TokenizedDataModule` for the
    arguments.
    """

    encoded_keys = ("input_ids", "labels")

    def read(self, path: str) -> list[dict[str, Any]]:
        """Read ``{"instruction", "input", "response"}`` records."""
        return read_jsonl(path, SFT_RECORD)

    def encode(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Prompt ids then response ids + EOS; labels mask the prompt."""
        prompt = format_prompt(self.tokenizer, record["input"], record["instruction"], self.hparams.prompt_format)
        prompt_ids = encode_prompt(self.tokenizer, prompt, self.hparams.prompt_format)
        response_ids = encode_response(self.tokenizer, record["response"])
        kept = fit_to_length(prompt_ids, response_ids, self.hparams.max_length)
        if kept is None:
            return None
        return {
            "input_ids": kept + response_ids,
            "labels": [IGNORE_INDEX] * len(kept) + response_ids,
            "truncated": len(kept) < len(prompt_ids),
        }

    def weight(self, example: dict[str, Any]) -> int:
        """Target tokens: the loss is averaged over tokens, not examples."""
        return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example."""
        return pad_batch(items, self.tokenizer.pad_token_id)
