"""One row per preference pair: the prompt once, then the chosen and the rejected answer.

The chosen and the rejected answer of a pair share their prompt. Scoring them as two padded rows
(``prompt + chosen``, ``prompt + rejected``) runs the prompt through the model twice; on our data
the prompt is over half of the tokens. A packed row ``prompt | chosen | rejected`` runs it once:
positions restart at the prompt's length for the rejected answer, and an attention mask
(:func:`~qod_lightning.logprobs.pair_attention_mask`) keeps the rejected tokens from seeing the
chosen ones, so every answer token sees exactly what it would see in its own row. The segment ids
and the ignored target value are the scorer's (:mod:`qod_lightning.logprobs`), which reads them.
"""

from __future__ import annotations

from typing import Any

import torch

from qod_lightning.data.tokenize import padded_length
from qod_lightning.logprobs import CHOSEN, IGNORE_INDEX, PAD, PROMPT, REJECTED


def pack_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    """Lay one pair out as ``prompt | chosen | rejected``.

    Args:
        prompt: Prompt ids.
        chosen: Chosen answer ids (EOS included).
        rejected: Rejected answer ids (EOS included).

    Returns:
        Lists of equal length ``len(prompt) + len(chosen) + len(rejected)``:

        * ``ids``: the tokens;
        * ``positions``: position ids, ``0..P+C-1`` then ``P..P+R-1`` for the rejected answer;
        * ``segments``: :data:`~qod_lightning.logprobs.PROMPT`, :data:`~qod_lightning.logprobs.CHOSEN` or
          :data:`~qod_lightning.logprobs.REJECTED` per token;
        * ``targets``: the answer tokens, ``-100`` on the prompt;
        * ``sources``: for each answer token, the index of the hidden state that predicts it
          (``t - 1``, except the first rejected token, predicted from the prompt's last token);
          0 on the prompt.

    """
    if not prompt or not chosen or not rejected:
        raise ValueError("a packed pair needs a non-empty prompt, chosen and rejected answer")
    p, c, r = len(prompt), len(chosen), len(rejected)
    chosen_sources = list(range(p - 1, p + c - 1))
    rejected_sources = [p - 1, *range(p + c, p + c + r - 1)]
    return {
        "ids": prompt + chosen + rejected,
        "positions": [*range(p + c), *range(p, p + r)],
        "segments": [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r,
        "targets": [IGNORE_INDEX] * p + chosen + rejected,
        "sources": [0] * p + chosen_sources + rejected_sources,
    }


def pack_pairs(items: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pack a batch of pairs, one row each, right-padded to the longest row (rounded up to ``pad_to_multiple_of``).

    Args:
        items: Examples with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``.
        pad_token_id: Id written into padding.
        pad_to_multiple_of: Round the row length up to a multiple of this (see
            :func:`~qod_lightning.data.tokenize.padded_length`).

    Returns:
        ``packed_ids``, ``packed_positions``, ``packed_segments``, ``packed_targets`` and
        ``packed_sources``, each (B, L); padding has segment :data:`~qod_lightning.logprobs.PAD`, target ``-100``,
        position and source 0.

    """
    rows = [pack_pair(item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]) for item in items]
    longest = padded_length(max(len(row["ids"]) for row in rows), pad_to_multiple_of)
    fills = {"ids": pad_token_id, "positions": 0, "segments": PAD, "targets": IGNORE_INDEX, "sources": 0}
    return {
        f"packed_{key}": torch.tensor([row[key] + [fill] * (longest - len(row[key])) for row in rows])
        for key, fill in fills.items()
    }
