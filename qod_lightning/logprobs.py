"""Log-probabilities of target tokens, summed per sequence.

Two entry points compute the same numbers: :func:`sequence_logps` from full logits (the reference
definition the tests use) and :func:`response_logps` from hidden states, which applies the LM head
only at response positions: prompt and padding logits are never needed, and on a 49k-token
vocabulary they are most of the work and memory of the head.
"""

from __future__ import annotations

import torch
from torch import nn

from qod_lightning.data.tokenize import IGNORE_INDEX


def _shift(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for positions ``0..T-2`` (token ``t+1`` is predicted at ``t``) and their mask."""
    targets = labels[:, 1:]  # (B, T-1)
    return targets, targets != IGNORE_INDEX


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` in float32 as ``logit[target] - logsumexp(logits)``.

    This never materialises the full log-softmax tensor.

    Args:
        logits: (N, V).
        targets: (N,) token ids.

    Returns:
        (N,) log-probabilities.

    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token log-probs per sequence.

    Args:
        logits: (B, T, V) model outputs; position ``t`` predicts token ``t+1``.
        labels: (B, T) token ids with ``-100`` on positions that do not count (prompt, padding).

    Returns:
        ``(logps, counts)``: (B,) summed log-probs (0 for a sequence with no target token, never
        NaN) and (B,) numbers of target tokens.

    """
    targets, mask = _shift(labels)
    logits = logits[:, :-1]  # (B, T-1, V)
    safe = targets.masked_fill(~mask, 0)  # any valid id; masked out below
    per_token = _token_logps(logits.reshape(-1, logits.size(-1)), safe.reshape(-1))  # (B*(T-1),)
    per_token = per_token.view_as(targets) * mask  # (B, T-1)
    return per_token.sum(-1), mask.sum(-1)


def response_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` computed from hidden states, running ``lm_head`` only where needed.

    Args:
        hidden: (B, T, H) last hidden states (after the final norm).
        lm_head: The output projection (H -> V).
        labels: (B, T) as in :func:`sequence_logps`.

    Returns:
        ``(logps, counts)``, each (B,).

    """
    targets, mask = _shift(labels)
    selected = hidden[:, :-1][mask]  # (N, H): only response positions
    per_token = _token_logps(lm_head(selected), targets[mask])  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) sequence of each response token
    logps = torch.zeros(labels.size(0), dtype=per_token.dtype, device=per_token.device)
    return logps.index_add(0, rows, per_token), mask.sum(-1)
