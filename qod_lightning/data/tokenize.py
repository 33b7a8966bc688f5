"""Turn prompt/response pairs into token ids with an exact prompt/response boundary.

The prompt and the response are tokenized separately and concatenated, so the prompt's tokens are
a prefix of the sequence by construction and the label mask starts exactly at the response. The
same prompt ids are what generation conditions on, so training and inference see one tokenization.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from qod_lightning.data.prompts import SYSTEM_PROMPT, format_alpaca
from qod_lightning.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)

PromptFormat = Literal["alpaca", "chat"]


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user_input: str,
    instruction: str = SYSTEM_PROMPT,
    prompt_format: PromptFormat = "alpaca",
) -> str:
    """Render the text the model sees before its answer.

    Args:
        tokenizer: Needed for the ``chat`` format (its chat template).
        user_input: The user's request.
        instruction: The system instruction.
        prompt_format: ``alpaca`` (the design's ``### Instruction/Input/Response`` template) or
            ``chat`` (the tokenizer's chat template with a system and a user turn).

    Returns:
        The prompt text, ending where the answer begins.

    """
    if prompt_format == "alpaca":
        return format_alpaca(instruction, user_input)
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format='chat' but the tokenizer has no chat template")
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": user_input}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt_format {prompt_format!r}; expected 'alpaca' or 'chat'")


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user_input: str,
    instruction: str = SYSTEM_PROMPT,
    prompt_format: PromptFormat = "alpaca",
) -> list[int]:
    """Token ids of the prompt for ``user_input`` (BOS included where the tokenizer adds one).

    The request is untrusted text: a request that spells a special token (``<|end|>``,
    ``<|im_start|>``) gets the ids of those characters, never the special token itself, so a user
    cannot close the turn or forge one. The template's own special tokens stay special.

    Args:
        tokenizer: The model's tokenizer.
        user_input: The user's request.
        instruction: The system instruction.
        prompt_format: As for :func:`format_prompt`.

    Returns:
        The prompt ids, ending where the answer begins.

    """
    if prompt_format == "alpaca":  # the template itself holds no special tokens
        text = format_prompt(tokenizer, user_input, instruction, prompt_format)
        return tokenizer(text, split_special_tokens=True)["input_ids"]
    # Render the template around a placeholder, then encode the request on its own.
    placeholder = "\x00request\x00"
    before, after = format_prompt(tokenizer, placeholder, instruction, prompt_format).split(placeholder)
    return [
        *tokenizer(before, add_special_tokens=False)["input_ids"],
        *tokenizer(user_input, add_special_tokens=False, split_special_tokens=True)["input_ids"],
        *tokenizer(after, add_special_tokens=False)["input_ids"],
    ]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of an answer followed by EOS, so the model learns to stop."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def keep_last(prompt_ids: list[int], room: int, bos_token_id: int | None) -> list[int]:
    """The last ``room`` ids of a prompt, with its leading BOS kept when it had one.

    The model only ever saw prompts that start with BOS (where its tokenizer adds one); cutting
    it away would make every truncated prompt unlike those it learned from.

    Args:
        prompt_ids: The prompt's ids.
        room: How many ids may stay (at least 1).
        bos_token_id: The tokenizer's BOS id, or ``None``.

    Returns:
        ``prompt_ids`` itself when it fits, else its last ``room`` ids (BOS and the last
        ``room - 1`` when the prompt starts with BOS and ``room`` is at least 2).

    """
    if len(prompt_ids) <= room:
        return prompt_ids
    if bos_token_id is not None and prompt_ids[0] == bos_token_id and room >= 2:
        return [bos_token_id, *prompt_ids[len(prompt_ids) - room + 1 :]]
    return prompt_ids[len(prompt_ids) - room :]


def fit_to_length(
    prompt_ids: list[int], response_ids: list[int], max_length: int, bos_token_id: int | None = None
) -> list[int] | None:
    """Apply the length policy to one example.

    The response is never cut: when prompt + response is too long, tokens are dropped from the
    start of the prompt (keeping a leading BOS, :func:`keep_last`), and when the response alone
    leaves no room for a prompt token the example is rejected.

    Args:
        prompt_ids: The prompt's ids.
        response_ids: The answer's ids (EOS included).
        max_length: Longest sequence in tokens.
        bos_token_id: The tokenizer's BOS id, kept at the start of a cut prompt.

    Returns:
        The (possibly truncated) prompt ids, or ``None`` when the example cannot fit.

    """
    room = max_length - len(response_ids)
    if room < 1:
        return None
    return keep_last(prompt_ids, room, bos_token_id)


def padded_length(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple``.

    A GPU kernel picked or built per input shape (cuBLAS heuristics, cuDNN attention graphs) is
    then chosen for few distinct lengths instead of one per batch.
    """
    if multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {multiple}")
    return -(-longest // multiple) * multiple


def pad_batch(
    sequences: list[dict[str, list[int]]],
    pad_token_id: int,
    keys: tuple[str, ...] = ("input_ids", "labels"),
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one, rounded up to ``pad_to_multiple_of``.

    The rounding may take a batch past ``max_length``: only padding goes there.

    Args:
        sequences: Examples with ``input_ids`` and ``labels`` of equal length each.
        pad_token_id: Id written into padded ``input_ids``; padded labels are ``-100``.
        keys: The id keys to pad; the first gives the attention mask.
        pad_to_multiple_of: Round the padded length up to a multiple of this (see :func:`padded_length`).

    Returns:
        ``input_ids`` and ``labels`` of shape (B, T) and ``attention_mask`` (B, T) of 0/1.

    """
    longest = padded_length(max(len(s[keys[0]]) for s in sequences), pad_to_multiple_of)
    batch: dict[str, Any] = {}
    for key in keys:
        fill = IGNORE_INDEX if key == "labels" else pad_token_id
        batch[key] = torch.tensor([s[key] + [fill] * (longest - len(s[key])) for s in sequences])
    batch["attention_mask"] = torch.tensor(
        [[1] * len(s[keys[0]]) + [0] * (longest - len(s[keys[0]])) for s in sequences]
    )
    return batch
