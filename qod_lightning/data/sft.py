"""SFT data: ``{"instruction", "input", "response"}`` records; loss only on response tokens + EOS."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from qod_lightning.data.base import TokenizedDataModule
from qod_lightning.data.jsonl import describe_duplicates, duplicate_lines, read_jsonl
from qod_lightning.data.prompts import SYSTEM_PROMPT
from qod_lightning.data.tokenize import encode_prompt, encode_response, fit_to_length, pad_batch
from qod_lightning.logprobs import IGNORE_INDEX
from qod_lightning.validation import answer_problem

SFT_RECORD = {"instruction": str, "input": str, "response": str}


class SFTDataModule(TokenizedDataModule):
    """Supervised fine-tuning batches: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Labels are ``-100`` on the prompt and on padding, so the loss falls on response tokens and
    the EOS that ends them. See :class:`~qod_lightning.data.base.TokenizedDataModule` for the
    arguments.
    """

    encoded_keys = ("input_ids", "labels")
    answer_key = "response"

    def read(self, path: str) -> list[dict[str, Any]]:
        """Read ``{"instruction", "input", "response"}`` records.

        Records are kept as they are, but three kinds are reported by line in a warning: repeats
        of an earlier record (one copy can land in each split), responses that are not a bare
        valid request for their input (the model would learn to write them), and instructions
        other than :data:`~qod_lightning.data.prompts.SYSTEM_PROMPT`, the one inference uses.
        """
        records = read_jsonl(path, SFT_RECORD)
        warn_about_records(path, records, SFT_RECORD, "response", "input")
        other = [r["_line"] for r in records if r["instruction"] != SYSTEM_PROMPT]
        if other:
            rank_zero_warn(
                f"{path}: {len(other)} record(s) carry an instruction other than the one generation "
                f"prompts with ({SYSTEM_PROMPT!r}), so the model is trained on prompts it will not be "
                f"asked: line(s) {other[:20]}{' and more' if len(other) > 20 else ''}"
            )
        return records

    def encode(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Prompt ids then response ids + EOS; labels mask the prompt."""
        prompt_ids = encode_prompt(self.tokenizer, record["input"], record["instruction"], self.hparams.prompt_format)
        response_ids = encode_response(self.tokenizer, record["response"])
        kept = fit_to_length(prompt_ids, response_ids, self.hparams.max_length, self.tokenizer.bos_token_id)
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
        """Right-pad to the longest example, rounded up to ``pad_to_multiple_of``."""
        return pad_batch(items, self.tokenizer.pad_token_id, pad_to_multiple_of=self.hparams.pad_to_multiple_of)


def warn_about_records(
    path: str, records: list[dict[str, Any]], keys: Iterable[str], answer_key: str, request_key: str
) -> None:
    """Warn, naming lines, about repeated records and about answers that are not valid requests.

    Args:
        path: The file the records came from.
        records: Its records (each with its ``_line``).
        keys: The keys that make two records the same.
        answer_key: The key holding the answer the model is trained towards.
        request_key: The key holding the user's request.

    """
    repeats = duplicate_lines(records, keys)
    if repeats:
        rank_zero_warn(f"{path}: {len(repeats)} duplicate record(s): {describe_duplicates(repeats)}")
    problems = [(r["_line"], answer_problem(r[answer_key], r[request_key])) for r in records]
    problems = [(line, problem) for line, problem in problems if problem is not None]
    if problems:
        first_line, first_problem = problems[0]
        shown = [line for line, _ in problems[:20]]
        more = f" and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        rank_zero_warn(
            f"{path}: {len(problems)} {answer_key}(s) are not a bare valid request for their "
            f"{request_key}: line(s) {shown}{more}; line {first_line}: {first_problem}"
        )
